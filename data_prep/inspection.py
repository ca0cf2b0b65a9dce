"""`inspect` (examples decoded back to text, plus statistics) and `verify` (every shard against the manifest)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from common.inventory import file_sha256

from .errors import DataPrepError
from .examples import record_dtype, unmasked_record_dtype
from .shards import FIELDS, MANIFEST, UNMASKED_FIELDS, Manifest
from .vocab import Vocab

log = logging.getLogger(__name__)

WINDOW = 8192  # rows read at a time: verify and inspect never hold a whole shard

# What h5py raises on a damaged file: OSError for what HDF5 reports (a bad header, a compression filter failing on
# corrupt chunk data), KeyError, ValueError or RuntimeError where damaged metadata makes a name or shape wrong.
H5_ERRORS = (OSError, KeyError, ValueError, RuntimeError)


class ShardReadError(DataPrepError):
    """A shard that cannot be read: `where` names the part (a dataset and its rows, or the file), `error` what h5py
    said."""

    def __init__(self, path: Path, where: str, error: BaseException | str):
        self.path, self.where, self.error = path, where, " ".join(str(error).split())
        super().__init__(f"{path}: {where} unreadable ({self.error})")


def _fields(f: h5py.File) -> tuple[str, ...]:
    """The datasets a shard of its kind holds: unmasked (word_starts, from --masking dynamic) or masked."""
    return UNMASKED_FIELDS if "word_starts" in f or f.attrs.get("masking") == "dynamic" else FIELDS


def _missing(f: h5py.File) -> list[str]:
    """The datasets of its kind that are not datasets in `f` (absent, or a damaged name now pointing at something
    else)."""
    return [name for name in _fields(f) if not isinstance(f.get(name), h5py.Dataset)]


def _windows(path: Path):
    """(first row, records) for each WINDOW rows of a shard, read dataset by dataset so that an error names one."""
    try:
        f = h5py.File(path, "r")
    except H5_ERRORS as e:
        raise ShardReadError(path, "HDF5 file", e) from None
    with f:
        try:
            if missing := _missing(f):
                raise ShardReadError(path, f"dataset {missing[0]}", "missing, or not a dataset")
            fields = _fields(f)
            n, length = f["input_ids"].shape
            dtype = (
                unmasked_record_dtype(length)
                if fields == UNMASKED_FIELDS
                else record_dtype(length, f["masked_lm_positions"].shape[1])
            )
        except H5_ERRORS as e:
            raise ShardReadError(path, "dataset shapes", e) from None
        for start in range(0, n, WINDOW):
            stop = min(start + WINDOW, n)
            recs = np.zeros(stop - start, dtype=dtype)
            for name in fields:
                try:
                    recs[name] = f[name][start:stop]
                except H5_ERRORS as e:
                    raise ShardReadError(path, f"dataset {name} (rows {start}-{stop - 1})", e) from None
            yield start, recs


# ----------------------------------------------------------------------------------------------- inspect


def render_example(rec: np.void, vocab: Vocab) -> str:
    """One example as text; a prediction shows as [MASK]{original}, <random piece>{original} or ={original} (kept).
    An unmasked example (dynamic masking) has none: its text is the pair as stored."""
    ids = rec["input_ids"].astype(np.int64)
    length = int(rec["input_mask"].sum())
    unmasked = "word_starts" in (rec.dtype.names or ())
    preds = (
        {} if unmasked else {int(p): int(t) for p, t in zip(rec["masked_lm_positions"], rec["masked_lm_ids"]) if p > 0}
    )
    out = []
    for pos in range(length):
        piece = vocab.pieces[ids[pos]]
        if pos in preds:
            original = vocab.pieces[preds[pos]]
            lead = " " if original.startswith("\u2581") else ""
            original = original.lstrip("\u2581")
            if ids[pos] == vocab.mask_id:
                piece = f"{lead}[MASK]{{{original}}}"
            elif ids[pos] == preds[pos]:
                piece = f"{lead}={{{original}}}"
            else:
                piece = f"{lead}<{piece.lstrip(chr(0x2581))}>{{{original}}}"
        elif piece in ("[CLS]", "[SEP]"):
            piece = f" {piece} "
        out.append(piece.replace("\u2581", " "))
    text = " ".join("".join(out).split())
    label = int(rec["next_sentence_labels"])
    masks = f"words={int(rec['word_starts'].sum())} (unmasked)" if unmasked else f"predictions={len(preds)}"
    return f"sop_label={label} ({'swapped' if label else 'in order'}) length={length} {masks}\n  {text}"


@dataclass
class ShardStats:
    examples: int = 0
    tokens: int = 0
    positions: int = 0
    maskable: int = 0
    predictions: int = 0
    replaced_mask: int = 0
    swapped: int = 0
    words: int = 0  # unmasked shards (dynamic masking): whole words, the units the loader masks
    unmasked: bool = False
    span_words: list[int] = field(default_factory=lambda: [0] * 7)  # contiguous masked runs, in words (6 = 6+)
    length_hist: list[int] = field(default_factory=lambda: [0] * 8)

    def add(self, recs: np.ndarray, vocab: Vocab) -> None:
        ids, mask = recs["input_ids"].astype(np.int64), recs["input_mask"].astype(bool)
        L = ids.shape[1]
        lengths = mask.sum(1)
        self.examples += len(recs)
        self.tokens += int(lengths.sum())
        self.positions += ids.size
        self.maskable += int((lengths - 3).sum())
        self.swapped += int(recs["next_sentence_labels"].sum())
        for b, h in enumerate(np.bincount(np.minimum(lengths * 8 // (L + 1), 7), minlength=8)):
            self.length_hist[b] += int(h)
        if "word_starts" in (recs.dtype.names or ()):
            self.unmasked = True
            self.words += int(recs["word_starts"].astype(np.int64).sum())
            return
        pos, lm = recs["masked_lm_positions"].astype(np.int64), recs["masked_lm_ids"].astype(np.int64)
        real = pos > 0
        self.predictions += int(real.sum())
        rows = np.nonzero(real)[0]
        self.replaced_mask += int((ids[rows, pos[real]] == vocab.mask_id).sum())
        # Masked spans: runs of consecutive masked positions, counted in words (a word starts at "▁").
        starts_word = vocab.is_word_start[lm]
        for r in range(len(recs)):
            p, w = pos[r][real[r]], starts_word[r][real[r]]
            if len(p) == 0:
                continue
            breaks = np.flatnonzero(np.diff(p) != 1) + 1
            for run in np.split(np.arange(len(p)), breaks):
                words = max(1, int(w[run].sum()))
                self.span_words[min(words, 6)] += 1

    def lines(self) -> list[str]:
        n = max(self.examples, 1)
        spans = max(sum(self.span_words), 1)
        hist = ", ".join(
            f"{k}{'+' if k == 6 else ''}: {100 * v / spans:.1f}%" for k, v in enumerate(self.span_words) if k
        )
        lengths = ", ".join(f"{v}" for v in self.length_hist)
        common = [
            f"SOP: {100 * self.swapped / n:.1f}% swapped (label 1), {100 - 100 * self.swapped / n:.1f}% in order",
            f"length histogram (8 equal bins up to max_seq_length): {lengths}",
            f"padding fraction: {100 * (1 - self.tokens / max(self.positions, 1)):.1f}%",
        ]
        if self.unmasked:
            return [
                f"examples: {self.examples} (unmasked: masked by the loader each epoch)",
                f"whole words: {self.words / n:.1f} per example, {self.maskable / max(self.words, 1):.2f} tokens each",
                *common,
            ]
        return [
            f"examples: {self.examples}",
            f"masked fraction: {100 * self.predictions / max(self.maskable, 1):.2f}% of maskable tokens "
            f"({self.predictions / n:.1f} predictions per example; {100 * self.replaced_mask / max(self.predictions, 1):.1f}% shown as [MASK])",
            f"masked spans in words (adjacent n-grams merge): {hist}",
            *common,
        ]


def inspect_shard(path: Path, vocab: Vocab | None = None, num_examples: int = 3) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataPrepError(f"{path}: no such shard")
    if vocab is None:
        spm = path.parent / "spiece.model"
        if not spm.exists():
            raise DataPrepError(f"{path}: no spiece.model beside the shard; pass --spm-model")
        vocab = Vocab(spm)
    out = [f"== {path}"]
    stats = ShardStats()
    try:
        for start, recs in _windows(path):
            if start == 0:
                for i in range(min(num_examples, len(recs))):
                    out.append(f"-- example {i}: " + render_example(recs[i], vocab))
            stats.add(recs, vocab)
    except ShardReadError as e:
        verdict = _listed_checksum(path)
        raise DataPrepError(f"{e}; {verdict}" if verdict else str(e)) from None
    except (IndexError, ValueError) as e:  # ids or positions beyond the vocabulary or the sequence
        verdict = _listed_checksum(path)
        raise DataPrepError(
            f"{path}: values out of range ({e}){'; ' + verdict if verdict else ''}; `albert-data verify` lists the rows"
        ) from None
    out.append("-- statistics")
    out.extend(stats.lines())
    return out


# ----------------------------------------------------------------------------------------------- verify


def _listed_checksum(path: Path) -> str | None:
    """The sha256 verdict on a shard listed in the manifest beside it, or None (no readable manifest lists it)."""
    try:
        manifest = Manifest.load(path.parent)
    except DataPrepError:
        return None
    if _manifest_problem(path.parent, manifest) is not None:
        return None
    entry = next((e for e in manifest.shards if e["name"] == path.name), None)
    return _checksum(path, entry["sha256"]) if entry else None


def _check_records(recs: np.ndarray, start: int, vocab: Vocab, problems: dict[str, list[int]]) -> None:
    ids = recs["input_ids"].astype(np.int64)
    mask = recs["input_mask"].astype(np.int64)
    seg = recs["segment_ids"].astype(np.int64)
    lab = recs["next_sentence_labels"].astype(np.int64)
    n, L = ids.shape
    rows = np.arange(n)
    lengths = mask.sum(1)

    def flag(kind: str, bad: np.ndarray | np.bool_) -> None:
        if bad.any():
            lst = problems.setdefault(kind, [0, start + int(np.flatnonzero(bad)[0])])
            lst[0] += int(bad.sum())

    flag("input_ids out of the vocabulary", (ids >= vocab.vocab_size).any(1))
    flag("input_mask not 0/1 or not ones-then-zeros", (mask > 1).any(1) | (np.diff(mask, axis=1) > 0).any(1))
    flag("sequence shorter than [CLS] a [SEP] b [SEP]", lengths < 5)
    flag("first token is not [CLS]", ids[:, 0] != vocab.cls_id)
    last = np.clip(lengths - 1, 0, L - 1)
    flag("last real token is not [SEP]", ids[rows, last] != vocab.sep_id)
    flag("not exactly two [SEP]", (ids == vocab.sep_id).sum(1) != 2)
    padding = mask == 0
    flag("non-zero input_ids on padding", (padding & (ids != 0)).any(1))
    flag("segment_ids not 0/1 or non-zero on padding", (seg > 1).any(1) | (padding & (seg != 0)).any(1))
    flag("next_sentence_labels not 0/1", lab > 1)
    if "word_starts" in (recs.dtype.names or ()):
        _check_word_starts(recs["word_starts"].astype(np.int64), ids, lengths, seg, vocab, flag)
        return
    pos = recs["masked_lm_positions"].astype(np.int64)
    lm = recs["masked_lm_ids"].astype(np.int64)
    flag("masked_lm_ids out of the vocabulary", (lm >= vocab.vocab_size).any(1))
    real = pos > 0
    flag("prediction padding not at the end", (np.diff(real.astype(np.int64), axis=1) > 0).any(1))
    flag("masked positions not strictly increasing", ((np.diff(pos, axis=1) <= 0) & real[:, 1:]).any(1))
    flag("no predictions", ~real.any(1))
    inside = pos < lengths[:, None]
    flag("masked position outside the sequence", (real & ~inside).any(1))
    at = ids[rows[:, None], np.clip(pos, 0, L - 1)]
    flag("masked position on [CLS]/[SEP]", (real & ((at == vocab.sep_id) | (at == vocab.cls_id))).any(1))
    flag(
        "masked_lm_ids on a prediction is [CLS]/[SEP]/padding",
        (real & ((lm == 0) | (lm == vocab.cls_id) | (lm == vocab.sep_id))).any(1),
    )
    flag("non-zero masked_lm_ids on prediction padding", (~real & (lm != 0)).any(1))


def _check_word_starts(
    words: np.ndarray, ids: np.ndarray, lengths: np.ndarray, seg: np.ndarray, vocab: Vocab, flag
) -> None:
    """An unmasked shard's word starts: 0/1, on maskable tokens only, one at the start of each segment, and no masked
    token in the text (the loader masks it)."""
    n, L = ids.shape
    rows = np.arange(n)
    J = np.arange(L)[None, :]
    first_sep = (seg == 0).sum(1) - (L - lengths) - 1  # [CLS] A [SEP] is segment 0, and so is the padding
    maskable = (J >= 1) & (J < lengths[:, None] - 1) & (J != first_sep[:, None])
    flag("word_starts not 0/1", (words > 1).any(1))
    flag("word start on [CLS]/[SEP]/padding", ((words > 0) & ~maskable).any(1))
    second = np.clip(first_sep + 1, 0, L - 1)
    flag("a segment not starting with a word", (words[:, 1] == 0) | (words[rows, second] == 0))
    flag("[MASK] in an unmasked example", (ids == vocab.mask_id).any(1))


def _checksum(path: Path, expected: str) -> str:
    """The sha256 verdict on a shard, as it reads in a problem line."""
    try:
        same = file_sha256(path) == expected
    except OSError as e:
        return f"sha256 not computed: {e.strerror or e}"
    return f"sha256 {'matches' if same else 'differs from'} {MANIFEST}"


def _check_shard(path: Path, entry: dict, attrs: dict, vocab: Vocab) -> tuple[list[str], int]:
    """The problems of one shard listed in the manifest, and its number of examples (0 when unreadable)."""
    problems: list[str] = []
    verdict = _checksum(path, entry["sha256"])
    if not verdict.endswith(f"matches {MANIFEST}"):
        problems.append(f"{path}: {verdict} (file changed or corrupt)")
    L, P = attrs.get("max_seq_length"), attrs.get("max_predictions_per_seq")
    try:
        with h5py.File(path, "r") as f:
            missing = _missing(f)
            if missing:
                return problems + [f"{path}: missing datasets {', '.join(missing)}; {verdict}"], 0
            n = f["input_ids"].shape[0]
            expect = {
                "input_ids": ((n, L), np.uint16),
                "input_mask": ((n, L), np.uint8),
                "segment_ids": ((n, L), np.uint8),
                "masked_lm_positions": ((n, P), np.uint16),
                "masked_lm_ids": ((n, P), np.uint16),
                "word_starts": ((n, L), np.uint8),
                "next_sentence_labels": ((n,), np.uint8),
            }
            if (fields := _fields(f)) != (UNMASKED_FIELDS if attrs.get("masking") == "dynamic" else FIELDS):
                return problems + [
                    f"{path}: a {'un' if fields == UNMASKED_FIELDS else ''}masked shard in a folder "
                    f"of {'unmasked' if attrs.get('masking') == 'dynamic' else 'masked'} shards"
                ], 0
            expect = {key: expect[key] for key in fields}
            for key, (shape, dtype) in expect.items():
                if f[key].shape != shape or f[key].dtype != dtype:
                    problems.append(
                        f"{path}: dataset {key} is {f[key].shape} {f[key].dtype}, expected {shape} {np.dtype(dtype)}"
                    )
            for key in ("vocab_sha256", "max_seq_length", "max_predictions_per_seq"):
                if key in attrs and (key not in f.attrs or not np.array_equal(f.attrs[key], attrs[key])):
                    problems.append(f"{path}: attribute {key} differs from {MANIFEST}")
            if f.attrs.get("sentence_task") != "sop":
                problems.append(f"{path}: sentence_task attribute is not 'sop'")
    except H5_ERRORS as e:
        return problems + [f"{path}: not a readable HDF5 file ({' '.join(str(e).split())}); {verdict}"], 0
    if n != entry["num_examples"]:
        problems.append(f"{path}: {n} examples, {MANIFEST} says {entry['num_examples']}")
    if any(p.startswith(f"{path}: dataset") for p in problems):
        return problems, n
    found: dict[str, list[int]] = {}
    try:
        for start, recs in _windows(path):
            _check_records(recs, start, vocab, found)
    except ShardReadError as e:  # the rows read so far were checked: their problems are reported too
        problems.append(f"{e}; {verdict}")
    for kind, (count, first) in found.items():
        problems.append(f"{path}: {kind}: {count} rows (first: row {first})")
    return problems, n


def _manifest_problem(folder: Path, manifest: Manifest) -> str | None:
    """What makes the manifest's own entries unusable (a hand-edited or damaged manifest), or None."""
    path = folder / MANIFEST
    vocab = manifest.data.get("vocab")
    if (
        not isinstance(vocab, dict)
        or not isinstance(vocab.get("file"), str)
        or not isinstance(vocab.get("sha256"), str)
    ):
        return f"{path}: vocab is not an object with string file and sha256"
    if not isinstance(manifest.data.get("attributes", {}), dict) or not isinstance(manifest.shards, list):
        return f"{path}: attributes is not an object or shards not a list"
    for i, entry in enumerate(manifest.shards):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("num_examples"), int)
        ):
            return f"{path}: shards[{i}] is not an object with name, sha256 and num_examples"
    return None


def verify_folder(folder: Path, progress: bool = False) -> list[str]:
    """Every problem found, one line each (empty when the folder is sound). A shard that cannot be read is one
    line naming the file, the dataset (or the file's header) and whether its sha256 still matches the manifest."""
    from tqdm import tqdm

    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder}: no such folder"]
    try:
        manifest = Manifest.load(folder)
    except DataPrepError as e:
        return [str(e)]
    if (bad := _manifest_problem(folder, manifest)) is not None:
        return [bad]
    problems: list[str] = []
    attrs = manifest.data.get("attributes", {})
    vocab_path = folder / manifest.data["vocab"]["file"]
    if not vocab_path.is_file():
        return problems + [f"{vocab_path}: vocabulary named in {MANIFEST} is missing"]
    if file_sha256(vocab_path) != manifest.data["vocab"]["sha256"]:
        problems.append(f"{vocab_path}: sha256 differs from {MANIFEST}")
    try:
        vocab = Vocab(vocab_path)
    except DataPrepError as e:
        return problems + [str(e)]
    listed = {s["name"] for s in manifest.shards}
    for extra in sorted(p.name for p in folder.glob("*.h5")):
        if extra not in listed:
            problems.append(f"{folder / extra}: shard not listed in {MANIFEST}")
    total = 0
    for entry in tqdm(manifest.shards, desc="verify", unit="shard", disable=not progress):
        path = folder / entry["name"]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        found, n = _check_shard(path, entry, attrs, vocab)
        problems.extend(found)
        total += n
    if total != manifest.data.get("num_examples", total):
        problems.append(
            f"{folder / MANIFEST}: num_examples {manifest.data['num_examples']} but the shards hold {total}"
        )
    return problems
