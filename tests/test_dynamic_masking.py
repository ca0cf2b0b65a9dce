"""Dynamic masking: unmasked shards (`albert-data shard --masking dynamic`) masked by the loader.

The masks must follow the static generator's distribution (the same pairs, masked by both), and the mask of an
example must depend on (seed, epoch, example) alone: equal for any number of ranks, micro-batch split or resume.
"""

from __future__ import annotations

import json
import zlib

import h5py
import numpy as np
import pytest
from test_examples import TableVocab, corpus

from data_prep import examples as examples_module
from data_prep.cli import main as albert_data
from data_prep.examples import ExampleSettings, ExampleStats, make_examples
from data_prep.inspection import inspect_shard, verify_folder
from data_prep.shards import FIELDS, UNMASKED_FIELDS, Manifest, read_shard
from pipeline.data import DataError, PretrainingData
from pipeline.masking import Masker, MaskOverrides, MaskSettings

SEEDS = range(12)  # passes of the static generator over the synthetic corpus (each its own pairs)


# ------------------------------------------------------------------------------------------ the same pairs, both ways


def pairs_both_ways(settings: ExampleSettings):
    """For each seed, the static generator's records and the unmasked records of the same pairs (the pairing draws
    come first from one generator, so the same seed gives the same pairs), plus the static counts and the vocab."""
    tokens, sent_lengths, doc_sentences = corpus(np.random.default_rng(1234), 300)
    vocab = TableVocab(int(tokens.max()) + 1, 3)
    stats = ExampleStats()
    static, unmasked = [], []
    for seed in SEEDS:
        static.append(
            make_examples(tokens, sent_lengths, doc_sentences, vocab, settings, np.random.default_rng(seed), stats)
        )
        unmasked.append(
            make_examples(
                tokens, sent_lengths, doc_sentences, vocab, settings, np.random.default_rng(seed), ExampleStats(), True
            )
        )
    return np.concatenate(static), np.concatenate(unmasked), stats, vocab


def as_rows(records: np.ndarray) -> dict[str, np.ndarray]:
    return {k: records[k] for k in records.dtype.names}


def mask_epochs(unmasked: np.ndarray, vocab, settings: MaskSettings, epochs: int, seed: int = 3):
    """The unmasked records masked in epochs 0..epochs-1: (masked records of every epoch, n-gram histogram)."""
    masker = Masker(settings, seed, vocab.mask_id, vocab.normal_ids)
    out, hist = [], 0
    for epoch in range(epochs):
        fields, h = masker.mask(as_rows(unmasked), np.arange(len(unmasked)), epoch)
        out.append(fields)
        hist = hist + h
    return {k: np.concatenate([o[k] for o in out]) for k in FIELDS}, hist


def original_ids(rows) -> np.ndarray:
    """input_ids with the predicted tokens put back."""
    ids = rows["input_ids"].astype(np.int64).copy()
    pos, lm = rows["masked_lm_positions"].astype(np.int64), rows["masked_lm_ids"].astype(np.int64)
    r, c = np.nonzero(pos > 0)
    ids[r, pos[r, c]] = lm[r, c]
    return ids


def mask_statistics(rows, mask_id: int) -> dict[str, np.ndarray]:
    """Per-example and per-prediction samples of what the masks do."""
    pos = rows["masked_lm_positions"].astype(np.int64)
    real = pos > 0
    r, c = np.nonzero(real)
    shown = rows["input_ids"].astype(np.int64)[r, pos[r, c]]
    target = rows["masked_lm_ids"].astype(np.int64)[r, c]
    maskable = rows["input_mask"].astype(np.int64).sum(1) - 3
    return {
        "per_example": real.sum(1),
        "fraction": real.sum(1) / maskable,
        "as_mask": shown == mask_id,
        "kept": shown == target,
        "random": (shown != mask_id) & (shown != target),
    }


def assert_same_mean(a: np.ndarray, b: np.ndarray, what: str, z: float = 5.0) -> None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    se = np.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(a.mean() - b.mean()) <= z * se + 1e-12, f"{what}: {a.mean():.4f} vs {b.mean():.4f} (se {se:.4f})"


def assert_same_histogram(h1: np.ndarray, h2: np.ndarray, what: str, z: float = 5.0) -> None:
    n1, n2 = h1.sum(), h2.sum()
    for k, (a, b) in enumerate(zip(h1, h2)):
        p = (a + b) / (n1 + n2)
        se = np.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
        assert abs(a / n1 - b / n2) <= z * se + 1e-12, f"{what} bin {k}: {a / n1:.4f} vs {b / n2:.4f} (se {se:.4f})"


def assert_same_distribution(static, static_hist, dynamic, dynamic_hist, mask_id: int) -> None:
    s, d = mask_statistics(static, mask_id), mask_statistics(dynamic, mask_id)
    assert_same_histogram(np.asarray(static_hist[1:]), np.asarray(dynamic_hist[1:]), "n-gram sizes")
    assert_same_mean(s["fraction"], d["fraction"], "fraction of maskable tokens predicted")
    assert_same_mean(s["per_example"], d["per_example"], "predictions per example")
    for key in ("as_mask", "kept", "random"):
        assert_same_mean(s[key], d[key], f"80/10/10: {key}")


@pytest.fixture(scope="module")
def both_ways():
    settings = ExampleSettings()
    return (settings, *pairs_both_ways(settings))


def test_unmasked_pairs_are_the_static_pairs_before_masking(both_ways):
    _, static, unmasked, _, _ = both_ways
    assert len(static) == len(unmasked) > 3000
    assert np.array_equal(original_ids(as_rows(static)), unmasked["input_ids"])
    for k in ("input_mask", "segment_ids", "next_sentence_labels"):
        assert np.array_equal(static[k], unmasked[k]), k
    assert not np.isin(unmasked["input_ids"], [4]).any(), "no [MASK] in an unmasked pair"


def test_dynamic_masks_follow_the_static_distribution(both_ways):
    settings, static, unmasked, stats, vocab = both_ways
    mask = MaskSettings(settings.masked_lm_prob, settings.ngram, settings.max_predictions_per_seq)
    dynamic, hist = mask_epochs(unmasked, vocab, mask, epochs=3)
    assert_same_distribution(as_rows(static), stats.ngram_hist, dynamic, hist, vocab.mask_id)
    assert hist[2] > 0 and hist[3] > 0  # n-grams of every size were drawn
    # the masks are valid ones: the originals come back, predictions within each example's budget
    assert np.array_equal(original_ids(dynamic), np.concatenate([unmasked["input_ids"]] * 3))
    pos = dynamic["masked_lm_positions"].astype(np.int64)
    both_real = (pos[:, 1:] > 0) & (pos[:, :-1] > 0)
    assert (np.diff(pos, axis=1)[both_real] > 0).all() and ((pos[:, 1:] > 0) <= (pos[:, :-1] > 0)).all()


def test_a_wrong_ngram_distribution_is_detected(both_ways, monkeypatch):
    """The comparison has the power to see a mistake: P(n) uniform instead of ~ 1/n fails it."""
    settings, static, unmasked, stats, vocab = both_ways

    def uniform_cdfs(ngram: int) -> np.ndarray:
        cdfs = np.ones((ngram, ngram))
        for a in range(1, ngram + 1):
            cdfs[a - 1, :a] = np.arange(1, a + 1) / a
        return cdfs

    monkeypatch.setattr(examples_module, "_ngram_cdfs", uniform_cdfs)
    mask = MaskSettings(settings.masked_lm_prob, settings.ngram, settings.max_predictions_per_seq)
    dynamic, hist = mask_epochs(unmasked, vocab, mask, epochs=3)
    with pytest.raises(AssertionError, match="n-gram sizes"):
        assert_same_distribution(as_rows(static), stats.ngram_hist, dynamic, hist, vocab.mask_id)


def test_a_wrong_masking_fraction_is_detected(both_ways):
    settings, static, unmasked, stats, vocab = both_ways
    mask = MaskSettings(0.17, settings.ngram, settings.max_predictions_per_seq)
    dynamic, hist = mask_epochs(unmasked, vocab, mask, epochs=3)
    with pytest.raises(AssertionError, match="fraction|predictions per example"):
        assert_same_distribution(as_rows(static), stats.ngram_hist, dynamic, hist, vocab.mask_id)


def test_ngram_1_and_other_budgets_match_too():
    settings = ExampleSettings(ngram=1, masked_lm_prob=0.2, max_predictions_per_seq=12)
    static, unmasked, stats, vocab = pairs_both_ways(settings)
    dynamic, hist = mask_epochs(unmasked, vocab, MaskSettings(0.2, 1, 12), epochs=2)
    assert_same_distribution(as_rows(static), stats.ngram_hist, dynamic, hist, vocab.mask_id)
    assert hist[1] == hist.sum()
    assert (dynamic["masked_lm_positions"] > 0).sum(1).max() <= 12


def test_the_mask_of_an_example_depends_on_seed_epoch_and_id_only(both_ways):
    settings, _, unmasked, _, vocab = both_ways
    masker = Masker(MaskSettings(0.15, 3, 20), 11, vocab.mask_id, vocab.normal_ids)
    rows, ids = as_rows(unmasked), np.arange(len(unmasked)) + 1000
    whole = masker(rows, ids, 2)
    rng = np.random.default_rng(0)
    pick = rng.permutation(len(unmasked))[:257]  # another window: fewer rows, another order, other neighbours
    part = masker({k: v[pick] for k, v in rows.items()}, ids[pick], 2)
    for k in FIELDS:
        assert np.array_equal(part[k], whole[k][pick]), k
    other_epoch = masker(rows, ids, 3)
    other_seed = Masker(MaskSettings(0.15, 3, 20), 12, vocab.mask_id, vocab.normal_ids)(rows, ids, 2)
    for other in (other_epoch, other_seed):
        same = (other["masked_lm_positions"] == whole["masked_lm_positions"]).all(1)
        assert same.mean() < 0.05


def test_mask_settings_problems():
    assert MaskSettings(0.15, 3, 125).problem(128) is None
    assert "must be in [1, 125]" in MaskSettings(0.15, 3, 126).problem(128)
    assert "--ngram" in MaskSettings(0.15, 0, 20).problem(128)
    assert MaskOverrides().given() == []
    assert MaskOverrides(ngram=2).over(MaskSettings(0.15, 3, 20)) == MaskSettings(0.15, 2, 20)


# ------------------------------------------------------------------------------------------ real shards


@pytest.fixture(scope="module")
def dynamic_shards(wiki_corpus, spm_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("dynamic") / "out"
    args = ["--masking", "dynamic", "--num-shards", "3", "--seed", "7"]
    assert (
        albert_data(["shard", "--input", str(wiki_corpus), "--spm-model", str(spm_model), "--output", str(out), *args])
        == 0
    )
    return out


def test_dynamic_shards_schema_manifest_and_determinism(dynamic_shards, wiki_corpus, spm_model, tmp_path):
    manifest = Manifest.load(dynamic_shards)
    assert manifest.masking == "dynamic"
    assert (manifest.data["format"], manifest.data["schema_version"]) == ("albert-sop-unmasked", 1)
    assert manifest.data["attributes"]["masking"] == "dynamic" and manifest.data["attributes"]["dupe_factor"] == 1
    with h5py.File(dynamic_shards / manifest.shards[0]["name"]) as f:
        assert sorted(f.keys()) == sorted(UNMASKED_FIELDS)
        assert f.attrs["format"] == "albert-sop-unmasked" and f["word_starts"].dtype == np.uint8
    records = np.concatenate([read_shard(dynamic_shards / s["name"]) for s in manifest.shards])
    assert len(records) == manifest.data["num_examples"] > 1000
    assert verify_folder(dynamic_shards) == []
    text = "\n".join(inspect_shard(dynamic_shards / manifest.shards[0]["name"], num_examples=1))
    assert "unmasked" in text and "[MASK]" not in text
    # two workers: the same bytes
    again = tmp_path / "again"
    args = ["--masking", "dynamic", "--num-shards", "3", "--seed", "7", "--workers", "2", "--no-progress"]
    assert (
        albert_data(
            ["shard", "--input", str(wiki_corpus), "--spm-model", str(spm_model), "--output", str(again), *args]
        )
        == 0
    )
    assert [s["sha256"] for s in Manifest.load(again).shards] == [s["sha256"] for s in manifest.shards]


def test_verify_names_damaged_word_starts(dynamic_shards, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dynamic_shards, copy)
    name = Manifest.load(copy).shards[1]["name"]
    with h5py.File(copy / name, "r+") as f:
        words = f["word_starts"][:]
        words[5, 0] = 1  # on [CLS]
        f["word_starts"][:] = words
    problems = verify_folder(copy)
    assert any(f"{copy / name}: word start on [CLS]/[SEP]/padding: 1 rows (first: row 5)" in p for p in problems)


def test_a_masked_shard_among_unmasked_ones_is_named(dynamic_shards, wiki_shards, tmp_path):
    """One folder holds one kind (its manifest's format); a static shard copied over a dynamic one is named by verify
    and refused by the loader in one line."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dynamic_shards, copy)
    name = Manifest.load(copy).shards[0]["name"]
    shutil.copyfile(wiki_shards / Manifest.load(wiki_shards).shards[0]["name"], copy / name)
    assert f"{copy / name}: a masked shard in a folder of unmasked shards" in verify_folder(copy)
    with pytest.raises(DataError, match=f"{copy / name}: dataset word_starts missing"):
        PretrainingData(copy, 4, 1)


def epoch_masks(loader: PretrainingData, batches: int) -> dict[tuple[int, bytes], bytes]:
    """(epoch, the example unmasked) -> the example as the loader masked it, over `batches` micro-batches."""
    out = {}
    it = iter(loader)
    try:
        for _ in range(batches):
            epoch = loader.state.epoch  # (the epoch of the batch about to come)
            b = {k: v.numpy() for k, v in next(it).items()}
            for row, original in enumerate(original_ids(b)):
                out[(epoch, original.tobytes())] = b"".join(np.ascontiguousarray(b[k][row]).tobytes() for k in FIELDS)
    finally:
        loader.close()
    return out


def loaders(folder, world: int, micro: int, accum: int, seed: int = 5, **kw) -> list[PretrainingData]:
    return [PretrainingData(folder, micro, accum, rank, world, seed, window=64, **kw) for rank in range(world)]


def merged(parts: list[dict]) -> dict:
    out: dict = {}
    for p in parts:
        out.update(p)
    return out


def test_the_same_example_gets_the_same_mask_on_1_or_2_ranks_and_after_resumes(dynamic_shards):
    one = loaders(dynamic_shards, 1, 8, 2)[0]
    per_epoch = one.micro_batches_per_epoch
    reference = epoch_masks(one, 2 * per_epoch)  # epochs 0 and 1 on one rank
    two = merged(epoch_masks(d, 2 * d.micro_batches_per_epoch) for d in loaders(dynamic_shards, 2, 4, 2))
    common = reference.keys() & two.keys()
    assert len(common) > 0.9 * len(reference)
    assert all(reference[k] == two[k] for k in common)
    # epochs differ: the same example masked anew
    firsts = {k[1]: v for k, v in reference.items() if k[0] == 0}
    seconds = {k[1]: v for k, v in reference.items() if k[0] == 1}
    both = firsts.keys() & seconds.keys()
    assert sum(firsts[k] != seconds[k] for k in both) > 0.9 * len(both)

    # 2 ranks, stopped in the middle of the epoch and resumed on 1 rank with another micro-batch: the same masks
    stopped = loaders(dynamic_shards, 2, 4, 2)
    before = merged(epoch_masks(d, 10) for d in stopped)  # 5 optimizer steps
    state = stopped[0].state_dict()
    after = loaders(dynamic_shards, 1, 2, 8)[0]
    after.load_state_dict(state)
    rest = epoch_masks(after, after.remaining_in_epoch + 5)  # into the next epoch
    seen = {**before, **rest}
    assert len(before) + len(rest) == len(seen), "an example twice"
    assert all(reference[k] == v for k, v in seen.items() if k in reference)
    assert sum(k in reference for k in seen) > 0.9 * len(seen)


def test_masking_flags_are_refused_with_static_shards_and_checked_with_dynamic(wiki_shards, dynamic_shards):
    with pytest.raises(DataError, match="holds masked shards .*; --ngram applies only to unmasked shards"):
        PretrainingData(wiki_shards, 4, 1, masking=MaskOverrides(ngram=2))
    PretrainingData(wiki_shards, 4, 1, masking=MaskOverrides())  # none set: fine
    with pytest.raises(DataError, match=r"--max-predictions-per-seq 126: must be in \[1, 125\]"):
        PretrainingData(dynamic_shards, 4, 1, masking=MaskOverrides(max_predictions=126))
    data = PretrainingData(dynamic_shards, 4, 1, masking=MaskOverrides(max_predictions=30, masked_lm_prob=0.25))
    assert data.max_predictions == 30
    batch = next(iter(data))
    data.close()
    assert batch["masked_lm_positions"].shape == (4, 30) and set(batch) == set(FIELDS)
    assert (batch["masked_lm_positions"] > 0).sum(1).max() > 20  # 25% of up to 128 tokens, up to 30


# ------------------------------------------------------------------------------------------ albert-pretrain


@pytest.mark.slow
def test_pretrain_on_dynamic_shards_resumed_on_another_number_of_ranks_is_exact(dynamic_shards, tmp_path):
    """2 ranks for 4 steps, then 1 rank (accumulation 2) to step 8: every example trained on (CRC32 of its masked
    input_ids, as --record-batches writes them) is masked exactly as (seed, epoch 0, its global id) says, whichever
    rank and layout read it, and none is seen twice."""
    from helpers.engine_helpers import ds_config, metrics, pretrain

    def ok(proc):
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    flags = ["--record-batches", "--seed", "9", "--ngram", "2", "--masked-lm-prob", "0.2"]
    ok(pretrain(tmp_path, dynamic_shards, ds_config(2, "fp32", micro=4), steps=4, nproc=2, extra=flags))
    proc = pretrain(tmp_path, dynamic_shards, ds_config(0, "fp32", micro=4, accum=2), steps=8, nproc=1, extra=flags)
    ok(proc)
    assert "masked in the loader each epoch: masked_lm_prob 0.2, ngram 2, max_predictions 20" in proc.stderr
    assert [m["step"] for m in metrics(tmp_path)] == list(range(1, 9))
    seen = [
        c
        for f in sorted(tmp_path.glob("batches-rank*.jsonl"))
        for line in f.read_text().splitlines()
        for c in json.loads(line)["examples"]
    ]
    assert len(seen) == 64 and len(set(seen)) == 64

    records = np.concatenate([read_shard(dynamic_shards / s["name"]) for s in Manifest.load(dynamic_shards).shards])
    masker = PretrainingData(dynamic_shards, 8, 1, seed=9, masking=MaskOverrides(0.2, 2)).masker
    assert masker is not None
    masked = masker(as_rows(records), np.arange(len(records)), 0)["input_ids"]
    expected = {zlib.crc32(row.astype(np.int64).tobytes()) for row in masked}
    assert set(seen) <= expected
    unmasked = {zlib.crc32(row.astype(np.int64).tobytes()) for row in records["input_ids"]}
    assert sum(c in unmasked for c in seen) < 0.1 * len(seen)  # (all of a short example's predictions may be kept)
