"""albert-probe: the paired bootstrap on hand-made cases and against scipy/scikit-learn resample by resample, the
readers of the three data sets (the newsgroup pickle read safely, a malicious one refused), the representations
(lower-casing, the pieces of one word pooled, coverage), and real runs on a tiny exported ALBERT."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.model_fixtures import export_tiny_albert
from scipy.stats import spearmanr

from data_prep.errors import DataPrepError
from pipeline.bootstrap import (
    BootstrapSettings,
    bootstrap_classification_scores,
    bootstrap_spearman,
    paired_interval,
    resample_indices,
)
from pipeline.classification_metrics import classification_scores
from pipeline.demo import intrinsic_summary
from pipeline.intrinsic_probe import ProbeSettings, main, word_coverage
from pipeline.probe_data import (
    ProbeDataError,
    UnsafePickleError,
    WordPairs,
    clean_post,
    load_bunch,
    read_newsgroups,
    read_word_pairs,
)
from pipeline.probe_encoder import encode_texts, load_encoders, mean_pooled, word_pieces

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers")

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest, and alike on every machine, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sample(fetch) -> Path:
    """A sample corpus from the gensim wheel; skipped when offline and never cached."""
    try:
        return fetch()
    except DataPrepError as exc:
        pytest.skip(str(exc))


# ---------------------------------------------------------------------------------------------------------------
# The paired bootstrap


def test_identical_scores_give_the_interval_zero_zero():
    rng = np.random.default_rng(0)
    ratings, scores = rng.random(50), rng.random(50)
    indices = resample_indices(50, BootstrapSettings(resamples=500, seed=3))
    boot = bootstrap_spearman(ratings, scores, indices)
    point = spearmanr(ratings, scores).statistic
    interval = paired_interval(point, point, boot, boot.copy(), 0.95)
    assert (interval.difference, interval.low, interval.high) == (0.0, 0.0, 0.0)
    assert not interval.excludes_zero and interval.used == 500
    assert "includes zero" in interval.verdict()


def test_a_clear_difference_excludes_zero_and_says_which_way():
    rng = np.random.default_rng(1)
    ratings = rng.random(200)
    good = ratings + 0.1 * rng.standard_normal(200)  # rank correlation about 0.95
    unrelated = rng.random(200)  # about 0
    indices = resample_indices(200, BootstrapSettings(resamples=1000, seed=4))
    boot_good, boot_unrelated = (bootstrap_spearman(ratings, s, indices) for s in (good, unrelated))
    point_good, point_unrelated = (spearmanr(ratings, s).statistic for s in (good, unrelated))
    interval = paired_interval(point_good, point_unrelated, boot_good, boot_unrelated, 0.95)
    assert interval.low > 0.5 and interval.excludes_zero
    assert interval.low <= interval.difference <= interval.high
    assert interval.verdict() == "the 95% interval excludes zero: pretrained is higher than random init"
    reverse = paired_interval(point_unrelated, point_good, boot_unrelated, boot_good, 0.95)
    assert reverse.high < -0.5 and "pretrained is lower" in reverse.verdict()


def test_the_interval_is_the_percentiles_of_the_defined_differences():
    differences = np.concatenate([np.arange(101, dtype=float), [np.nan, np.nan]])
    interval = paired_interval(1.0, 0.5, differences, np.zeros(103), 0.90)
    assert (interval.low, interval.high) == pytest.approx((5.0, 95.0))  # the 5th and 95th percentiles of 0..100
    assert (interval.difference, interval.resamples, interval.used) == (0.5, 103, 101)
    assert interval.to_dict()["excludes_zero"] is True


def test_resamples_are_seeded_and_the_same_for_both_models():
    settings = BootstrapSettings(resamples=20, seed=9)
    assert np.array_equal(resample_indices(30, settings), resample_indices(30, settings))
    assert not np.array_equal(resample_indices(30, settings), resample_indices(30, BootstrapSettings(20, 0.95, 10)))


def test_bootstrap_spearman_equals_scipy_on_every_resample():
    rng = np.random.default_rng(2)
    ratings = rng.integers(0, 5, 40).astype(float)  # ties, as human ratings have
    scores = rng.random(40)
    indices = resample_indices(40, BootstrapSettings(resamples=30, seed=5))
    expected = [spearmanr(ratings[row], scores[row]).statistic for row in indices]
    assert bootstrap_spearman(ratings, scores, indices) == pytest.approx(expected)
    assert np.isnan(bootstrap_spearman(ratings, np.ones(40), indices)).all()  # constant: undefined


@pytest.mark.parametrize("classes, positive", [(2, None), (2, 1), (2, 0), (3, None)])
def test_bootstrap_classification_scores_equal_classification_scores(classes, positive):
    rng = np.random.default_rng(classes)
    n = 30
    y = rng.integers(0, classes, n)
    probs = rng.random((n, classes)) + 0.8 * np.eye(classes)[y]
    probs[:4] = probs[0]  # tied scores
    probs /= probs.sum(axis=1, keepdims=True)  # probabilities, as predict_proba gives
    indices = resample_indices(n, BootstrapSettings(resamples=25, seed=6))
    indices[0] = 0  # one resample of a single example: one class only, ROC-AUC undefined
    boot = bootstrap_classification_scores(y, probs, indices, positive)
    for r, row in enumerate(indices):
        expected = classification_scores(y[row], probs[row], positive)
        for metric, value in expected.items():
            if np.isnan(value):
                assert np.isnan(boot[metric][r]), (r, metric)
            else:
                assert boot[metric][r] == pytest.approx(value), (r, metric)


def test_two_class_macro_roc_auc_is_that_of_either_class():
    y = np.array([0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.6, 0.4, 0.8, 0.9])
    scores = classification_scores(y, np.stack([1 - p1, p1], axis=1))
    assert scores["roc_auc"] == pytest.approx(5 / 6)
    # predictions 0 1 0 1 1: class 0 P 1/2 R 1/2, class 1 P 2/3 R 2/3
    assert scores["precision"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert scores["f1"] == pytest.approx((1 / 2 + 2 / 3) / 2)


# ---------------------------------------------------------------------------------------------------------------
# Word pairs


def test_word_pairs_reader(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("# a header\n# Word 1\tWord 2\tHuman\nTiger\tcat\t7.35\n\nbook\tpaper\t7.46\nsun\tsky\t8\n")
    pairs = read_word_pairs(path)
    assert pairs.first == ["Tiger", "book", "sun"] and pairs.second == ["cat", "paper", "sky"]
    assert pairs.ratings.tolist() == [7.35, 7.46, 8.0] and pairs.words() == [
        "Tiger",
        "cat",
        "book",
        "paper",
        "sun",
        "sky",
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a\tb\t1\nc d 2\n", "line 2: expected 'word<TAB>word<TAB>rating'"),
        ("a\tb\tone\n", "line 1: the rating 'one' is not a number"),
        ("a\tb\tnan\n", "line 1: the rating 'nan' is not a number"),
        ("# only\na\tb\t1\n", "1 word pairs; a rank correlation needs 3 or more"),
    ],
)
def test_word_pairs_reader_errors(tmp_path, text, expected):
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(ProbeDataError) as e:
        read_word_pairs(path)
    assert str(e.value).startswith(f"{path}: ") and expected in str(e.value) and "\n" not in str(e.value)


def test_the_real_word_similarity_sets():
    from data_prep.sample_corpora import simlex999, wordsim353

    wordsim, simlex = read_word_pairs(sample(wordsim353)), read_word_pairs(sample(simlex999))
    assert (len(wordsim), len(wordsim.words())) == (353, 437) and (len(simlex), len(simlex.words())) == (999, 1028)
    assert ("tiger", "cat") in zip(wordsim.first, wordsim.second) and "Jerusalem" in wordsim.words()
    assert 0 <= wordsim.ratings.min() and wordsim.ratings.max() <= 10 and simlex.ratings.max() <= 10


# ---------------------------------------------------------------------------------------------------------------
# The newsgroups sample, read safely


def bunch_file(tmp_path: Path, payload: bytes, name: str = "bunch") -> Path:
    path = tmp_path / name
    path.write_bytes(zlib.compress(payload))
    return path


def test_the_real_newsgroups_sample_is_read_without_its_headers():
    from data_prep.sample_corpora import mini_newsgroup

    news = read_newsgroups(sample(mini_newsgroup))
    assert news.classes == ["alt.atheism", "sci.space"]
    assert len(news.texts) + news.empty == 200 and news.empty < 20
    assert news.class_counts() == {"alt.atheism": 97, "sci.space": 96}
    # the headers name the newsgroup: none of them may reach the classifier (one post quotes another's header in
    # its body, which scikit-learn's removal keeps too)
    assert sum("Newsgroups:" in text for text in news.texts) == 1
    for header in ("Path:", "Xref:", "Subject:", "Lines:"):
        assert not any(header in text for text in news.texts), header
    assert all(text and "\n" not in text and "  " not in text for text in news.texts)


def test_posts_lose_header_quotes_and_signature():
    post = (
        "From: someone@example.org\nNewsgroups: sci.space\nSubject: Re: orbits\n\n"
        "In article <1@x.org> other@x.org writes:\n> quoted line\n| also quoted\n"
        "The orbit   decays slowly.\nIt takes years.\n\n--\nSome One, Example Org\n"
    )
    assert clean_post(post) == "The orbit decays slowly. It takes years."
    assert clean_post("Subject: only a header\n") == ""


def test_a_python3_pickle_of_a_plain_bunch_loads(tmp_path):
    bunch = {
        "data": ["Subject: a\n\nabout space", "Subject: b\n\nabout god", "Subject: c\n\n"],
        "target": np.array([1, 0, 1]),
        "target_names": ["atheism", "space"],
    }
    news = read_newsgroups(bunch_file(tmp_path, pickle.dumps(bunch, protocol=4)))
    assert news.texts == ["about space", "about god"] and news.labels.tolist() == [1, 0] and news.empty == 1


class Marker:
    """A class of the test module: a pickle naming it must be refused as much as os.system."""


def test_a_pickle_naming_anything_else_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "ran"
    # protocol 0 by hand: os.system("touch ran"), what a malicious pickle does on a plain pickle.load
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    path = bunch_file(tmp_path, payload, "evil")
    with pytest.raises(UnsafePickleError) as e:
        load_bunch(path)
    message = str(e.value)
    assert message.startswith(f"{path}: the pickle names os.system") and "refused" in message and "\n" not in message
    assert not marker.exists()
    for obj, name in ((Marker(), f"{__name__}.Marker"), ({"data": [1j]}, "builtins.complex")):
        with pytest.raises(UnsafePickleError, match=f"names {name}, "):
            load_bunch(bunch_file(tmp_path, pickle.dumps(obj, protocol=4), "other"))


@pytest.mark.parametrize(
    "payload, expected",
    [
        (b"not zlib", "not zlib-compressed"),
        (zlib.compress(b"\x80\x04garbage"), "not a readable pickle"),
        (zlib.compress(pickle.dumps([1, 2])), "holds a list, not a Bunch"),
        (zlib.compress(pickle.dumps({"data": ["x"], "target": np.array([0])})), "the Bunch has no target_names"),
        (
            zlib.compress(pickle.dumps({"data": ["a", "b"], "target": np.array([0, 5]), "target_names": ["x", "y"]})),
            "class ids outside 0-1",
        ),
    ],
)
def test_bad_newsgroup_files_are_one_line_errors(tmp_path, payload, expected):
    path = tmp_path / "bad"
    path.write_bytes(payload)
    with pytest.raises(ProbeDataError) as e:
        read_newsgroups(path)
    assert str(e.value).startswith(f"{path}: ") and expected in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# A tiny exported ALBERT

# No 'q', 'z' or 'ζ': words with them have an <unk> piece.
WORDS = (
    "the cat sat on a mat and the dog ran in the park while space orbit moon planet rocket launch god belief church "
    "faith prayer bible star sun light year water house garden tree flower river mountain city street book paper "
    "computer keyboard internet money bank"
).split()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A tiny random AlbertForPreTraining with a SentencePiece model of lower-case text, exported as albert-export
    does (without export.json; one test adds it)."""
    folder = tmp_path_factory.mktemp("tiny-albert")
    rng = random.Random(0)
    text = [" ".join(rng.choices(WORDS, k=rng.randint(4, 10))) + " ." for _ in range(400)]
    return export_tiny_albert(folder, text, 60)


@pytest.fixture(scope="module")
def encoders(hf_folder):
    return load_encoders(hf_folder, seed=42, device=CPU)


def test_words_are_lower_cased_as_the_tokenizer_does(encoders):
    tokenizer = encoders.tokenizer
    assert word_pieces(tokenizer, "Orbit") == word_pieces(tokenizer, "orbit") == word_pieces(tokenizer, "ORBIT")
    pieces = encode_texts(tokenizer, ["Orbit", "orbit"], 64)
    vectors = mean_pooled(encoders.models["pretrained"], pieces, tokenizer.pad_token_id, CPU)
    assert np.array_equal(vectors[0], vectors[1])


def test_the_pieces_of_one_word_are_pooled(encoders):
    tokenizer = encoders.tokenizer
    model = encoders.models["pretrained"]
    word = next(w for w in ("belief", "space", "orbit", "park", "moon") if len(word_pieces(tokenizer, w)) >= 2)
    ids = [tokenizer.cls_token_id, *word_pieces(tokenizer, word), tokenizer.sep_token_id]
    with torch.inference_mode():
        hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    expected = hidden[1:-1].double().mean(dim=0).numpy()  # the word's pieces, not [CLS] and [SEP]
    pieces = encode_texts(tokenizer, [word, "the cat sat on the mat in the park"], 64)  # padded in one batch
    vectors = mean_pooled(model, pieces, tokenizer.pad_token_id, CPU)
    assert pieces.input_ids[0] == ids
    assert vectors[0] == pytest.approx(expected, abs=1e-5)
    assert not np.allclose(vectors[0], hidden[0].numpy(), atol=1e-3)  # not the [CLS] state


def test_pretrained_and_random_init_differ_and_random_init_is_seeded(hf_folder, encoders):
    pieces = encode_texts(encoders.tokenizer, ["moon", "dog"], 64)
    pad = encoders.tokenizer.pad_token_id
    pretrained, random_init = (mean_pooled(encoders.models[k], pieces, pad, CPU) for k in ("pretrained", "random-init"))
    again = load_encoders(hf_folder, seed=42, device=CPU).models["random-init"]
    assert not np.allclose(pretrained, random_init)
    assert np.array_equal(mean_pooled(again, pieces, pad, CPU), random_init)


def test_coverage_counts_pairs_whose_words_have_no_unknown_piece(encoders):
    # 'ζ' and 'q' never occur in the vocabulary's text: <unk>
    pairs = WordPairs(Path("pairs"), ["cat", "ζeta", "Moon", "dog"], ["dog", "cat", "space", "quiz"], np.arange(4.0))
    covered, coverage = word_coverage(encoders, pairs)
    assert covered == [True, False, True, False]
    assert coverage["pairs_covered"] == 2 and coverage["fraction"] == 0.5
    assert coverage["words"] == 6 and coverage["words_covered"] == 4
    assert coverage["uncovered_words"] == ["quiz", "ζeta"]
    one_piece = [w for w in ("cat", "Moon", "dog", "space") if len(word_pieces(encoders.tokenizer, w)) == 1]
    assert coverage["words_one_piece"] == len(one_piece)


# ---------------------------------------------------------------------------------------------------------------
# The command


def run_main(args, caplog) -> tuple[int, list[str], list[str]]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="albert-probe"):
        rc = main([str(a) for a in args])
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "albert-probe"]
    return rc, [m for level, m in messages if level >= logging.ERROR], [m for _, m in messages]


def test_every_probe_end_to_end_on_the_tiny_model(tmp_path, hf_folder, caplog):
    from data_prep.sample_corpora import mini_newsgroup, simlex999, wordsim353

    for fetch in (wordsim353, simlex999, mini_newsgroup):
        sample(fetch)
    model = tmp_path / "hf"
    model.mkdir()
    for path in hf_folder.iterdir():
        (model / path.name).write_bytes(path.read_bytes())
    record = {
        "tool": "albert-export",
        "files": {},
        "checkpoint": {"folder": "runs/x/checkpoints", "tag": "step-7", "step": 7},
    }
    (model / "export.json").write_text(json.dumps(record))
    out = tmp_path / "probe"
    args = ["--model", model, "--tasks", "wordsim353", "simlex999", "newsgroups", "--output", out, "--resamples", "200"]
    rc, errors, lines = run_main(args, caplog)
    assert rc == 0, errors
    results = json.loads((out / "results.json").read_text())
    assert results["tool"] == "albert-probe" and results["complete"]
    assert results["checkpoint"] == {"folder": "runs/x/checkpoints", "tag": "step-7", "step": 7}
    assert results["settings"]["max_seq_length"] == 64  # the model's positions, fewer than 128
    assert list(results["tasks"]) == ["wordsim353", "simlex999", "newsgroups"]
    for result in results["tasks"].values():
        for metric in result["metrics"]:
            interval = result["difference"][metric]
            difference = result["pretrained"][metric] - result["random-init"][metric]
            assert interval["difference"] == pytest.approx(difference)
            assert interval["low"] <= interval["high"] and interval["resamples"] == 200
            assert interval["excludes_zero"] == (interval["low"] > 0 or interval["high"] < 0)
            assert "interval" in result["verdict"][metric]
        assert result["settings"]["resamples"] == 200
    wordsim = results["tasks"]["wordsim353"]
    assert wordsim["metrics"] == ["spearman"] and wordsim["coverage"]["pairs"] == 353
    # a 60-piece vocabulary of a few words lacks many letters: some words are not covered
    assert 0 < wordsim["coverage"]["pairs_covered"] < 353 and wordsim["coverage"]["uncovered_words"]
    news = results["tasks"]["newsgroups"]
    assert news["metrics"] == ["accuracy", "precision", "recall", "f1", "roc_auc"]
    assert news["data"]["documents"] == 193 and news["data"]["truncated"] > 0
    assert 0 <= news["pretrained"]["accuracy"] <= 1 and 0 <= news["random-init"]["roc_auc"] <= 1
    table = "\n".join(lines)
    assert "albert-probe: " + str(model) + " (checkpoint step-7 of runs/x/checkpoints)" in table
    assert "wordsim353  Spearman" in table and "ROC-AUC" in table
    assert "includes zero" in table or "excludes zero" in table
    assert "353 pairs" in table and "193 posts" in table

    # the demo's rows, and its one line of conclusion
    summary = intrinsic_summary(results, 300)
    assert len(summary) == 2 + 4 + 1 and summary[-1].startswith("  at demo scale: ")
    assert "WordSim-353 Spearman" in summary[2] and "newsgroups ROC-AUC" in summary[5]

    # a rerun into its own earlier output replaces results.json, and gives the same figures
    rc, errors, _ = run_main(args, caplog)
    assert rc == 0, errors
    again = json.loads((out / "results.json").read_text())
    assert again["tasks"] == results["tasks"]


def test_command_errors_exit_2_with_one_line(tmp_path, hf_folder, caplog):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    cases = [
        (["--tasks", "wordsim353", "sentiment"], "--tasks sentiment: unknown task (the tasks: wordsim353, simlex999"),
        (["--resamples", "10"], "--resamples 10: must be at least 100"),
        (["--confidence", "1.5"], "--confidence 1.5: must be between 0 and 1"),
        (["--output", foreign], f"--output {foreign}: the folder holds notes.txt and is not an earlier albert-probe"),
        (["--output", tmp_path / "file"], f"--output {tmp_path / 'file'}: is a file, not a folder"),
        (["--model", tmp_path / "nowhere"], f"{tmp_path / 'nowhere'}: no such folder"),
        (["--model", empty], f"{empty}: no config.json"),
        (["--max-seq-length", "65"], f"{hf_folder}: --max-seq-length 65 exceeds the model's 64 positions"),
    ]
    for extra, expected in cases:
        args = ["--model", hf_folder, "--output", tmp_path / "out", "--tasks", "simlex999", *extra]
        # argparse keeps the last value of a repeated flag: the case's own --model, --output, --tasks win
        rc, errors, _ = run_main(args, caplog)
        assert rc == 2, (extra, errors)
        assert len(errors) == 1 and errors[0].startswith(expected) and "\n" not in errors[0], errors
    assert not (tmp_path / "out").exists() and (foreign / "notes.txt").read_text() == "mine"


def test_the_settings_are_checked_once(tmp_path):
    ProbeSettings(model=tmp_path, output=tmp_path / "out").check()
    with pytest.raises(ValueError, match="named twice"):
        ProbeSettings(model=tmp_path, output=tmp_path, tasks=("simlex999", "simlex999")).check()


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "albert-probe --model" in text and "--tasks" in text and "--resamples" in text
