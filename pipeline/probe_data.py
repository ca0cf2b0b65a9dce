"""The data of `albert-probe`: word pairs with human ratings (WordSim-353, SimLex-999) and the 20-newsgroups sample.

The newsgroups sample ships as a zlib-compressed Python 2 pickle of a scikit-learn Bunch. Unpickling calls whatever
the file names, so it is read by `BunchUnpickler`, which resolves only the few names such a Bunch of texts and
numpy arrays needs (each to a constructor of ours or numpy's, not to scikit-learn) and refuses any other. The
posts keep their Usenet headers, which name the newsgroup (the label); they are removed, with signatures and quoted
lines, as scikit-learn's `fetch_20newsgroups(remove=("headers", "footers", "quotes"))` removes them.

Every problem is a `ProbeDataError` whose one-line message names the file (and the line where there is one).
"""

from __future__ import annotations

import io
import math
import pickle
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class ProbeDataError(ValueError):
    """Data a probe cannot read; the message names the file and the problem, on one line."""


# ---------------------------------------------------------------------------------------------------------------
# Word pairs


@dataclass(frozen=True)
class WordPairs:
    path: Path
    first: list[str]
    second: list[str]
    ratings: np.ndarray  # float64, one per pair

    def __len__(self) -> int:
        return len(self.first)

    def words(self) -> list[str]:
        """The distinct words, in order of first appearance."""
        return list(dict.fromkeys(w for pair in zip(self.first, self.second) for w in pair))


def read_word_pairs(path: Path) -> WordPairs:
    """`word1<TAB>word2<TAB>rating` lines; blank lines and lines starting with '#' are skipped. Words are kept as
    written: the tokenizer lower-cases them where the model was trained on lower-cased text."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProbeDataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProbeDataError(f"{path}: cannot be read ({e})") from None
    first, second, ratings = [], [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 3 or not fields[0].strip() or not fields[1].strip():
            raise ProbeDataError(f"{path}: line {number}: expected 'word<TAB>word<TAB>rating', got {line[:60]!r}")
        try:
            rating = float(fields[2])
        except ValueError:
            rating = math.nan
        if not math.isfinite(rating):
            raise ProbeDataError(f"{path}: line {number}: the rating {fields[2]!r} is not a number")
        first.append(fields[0].strip())
        second.append(fields[1].strip())
        ratings.append(rating)
    if len(first) < 3:
        raise ProbeDataError(f"{path}: {len(first)} word pairs; a rank correlation needs 3 or more")
    return WordPairs(path, first, second, np.asarray(ratings, dtype=np.float64))


# ---------------------------------------------------------------------------------------------------------------
# The newsgroups sample


class UnsafePickleError(ProbeDataError):
    """A pickle that names something other than what a Bunch of texts and arrays needs."""


class _Bunch(dict):
    """What scikit-learn's Bunch holds: a dict (its attribute access is not needed here)."""


def _reconstructor(cls: Any, base: Any, state: Any) -> _Bunch:
    """copyreg._reconstructor as a Python 2 pickle of a dict subclass calls it; only for the Bunch."""
    if cls is not _Bunch or base is not dict or not isinstance(state, dict):
        raise pickle.UnpicklingError(f"_reconstructor({cls!r}, {base!r}, ...) is not a Bunch")
    return _Bunch(state)


def _ndarray_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's `_reconstruct` (an empty array that the pickle's state then fills), for plain ndarrays only."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"_reconstruct of {subtype!r}, not numpy.ndarray")
    return np.ndarray.__new__(np.ndarray, shape, np.dtype(dtype))


# (module, name) as a Python 2 or 3 pickle writes them -> what they resolve to. Nothing else is importable.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("__builtin__", "dict"): dict,
    ("builtins", "dict"): dict,
    ("sklearn.datasets.base", "Bunch"): _Bunch,
    ("sklearn.utils", "Bunch"): _Bunch,
    ("sklearn.utils._bunch", "Bunch"): _Bunch,
    ("numpy.core.multiarray", "_reconstruct"): _ndarray_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _ndarray_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class BunchUnpickler(pickle.Unpickler):
    """An unpickler that resolves only `_ALLOWED`; any other global (a function, a class, a module) is refused
    before it is imported or called."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"names {module}.{name}, which a Bunch of texts and numpy arrays does not need; refused (nothing "
                "else than a dict, the Bunch and numpy's array reconstruction is loaded)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("holds a persistent id; refused")


def load_bunch(path: Path) -> dict[str, Any]:
    """The dict inside a zlib-compressed pickle of a Bunch, read by `BunchUnpickler`."""
    path = Path(path)
    try:
        raw = zlib.decompress(path.read_bytes())
    except FileNotFoundError:
        raise ProbeDataError(f"{path}: no such file") from None
    except OSError as e:
        raise ProbeDataError(f"{path}: cannot be read ({e.strerror or e})") from None
    except zlib.error as e:
        raise ProbeDataError(f"{path}: not zlib-compressed ({e})") from None
    try:
        # latin1: Python 2 byte strings (numpy's array buffers among them) come back byte for byte.
        obj = BunchUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: the pickle {e}") from None
    except Exception as e:  # a malformed pickle raises almost anything; every one is the file's fault
        raise ProbeDataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ProbeDataError(f"{path}: the pickle holds a {type(obj).__name__}, not a Bunch")
    return dict(obj)


@dataclass(frozen=True)
class Newsgroups:
    path: Path
    texts: list[str]  # headers, signatures and quoted lines removed; whitespace collapsed
    labels: np.ndarray  # class ids, int64
    classes: list[str]  # newsgroup names, by class id
    empty: int  # posts left with no text after the removal, and dropped

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.labels.tolist())
        return {name: counts[i] for i, name in enumerate(self.classes)}


def read_newsgroups(path: Path) -> Newsgroups:
    """The newsgroups sample: a Bunch with `data` (posts), `target` (class ids) and `target_names`."""
    bunch = load_bunch(path)
    missing = [key for key in ("data", "target", "target_names") if key not in bunch]
    if missing:
        raise ProbeDataError(f"{path}: the Bunch has no {', '.join(missing)} (it has: {', '.join(map(str, bunch))})")
    posts, target, names = bunch["data"], np.asarray(bunch["target"]), bunch["target_names"]
    if not isinstance(posts, list) or not all(isinstance(p, str) for p in posts):
        raise ProbeDataError(f"{path}: 'data' is not a list of texts")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ProbeDataError(f"{path}: 'target_names' is not a list of names")
    if target.shape != (len(posts),) or target.dtype.kind not in "iu":
        raise ProbeDataError(f"{path}: 'target' holds {target.shape} {target.dtype}, not one class id per post")
    if len(posts) and (target.min() < 0 or target.max() >= len(names)):
        raise ProbeDataError(f"{path}: 'target' has class ids outside 0-{len(names) - 1}")
    texts = [clean_post(p) for p in posts]
    keep = [i for i, t in enumerate(texts) if t]
    labels = target.astype(np.int64)[keep]
    if len(set(labels.tolist())) < 2:
        raise ProbeDataError(f"{path}: fewer than two newsgroups have posts with text")
    return Newsgroups(Path(path), [texts[i] for i in keep], labels, list(names), len(texts) - len(keep))


_QUOTE_LINE = re.compile(r"(writes in|writes:|wrote:|says:|said:|^In article|^Quoted from|^\||^>)")


def strip_header(post: str) -> str:
    """Everything after the first blank line (the header block ends there)."""
    return post.partition("\n\n")[2]


def strip_quotes(post: str) -> str:
    """Lines quoting another post, and the 'X writes:' lines that introduce them."""
    return "\n".join(line for line in post.split("\n") if not _QUOTE_LINE.search(line))


def strip_footer(post: str) -> str:
    """A signature: everything from the last blank or dashes-only line on (none: the post as it is)."""
    lines = post.strip().split("\n")
    for number in range(len(lines) - 1, -1, -1):
        if lines[number].strip().strip("-") == "":
            return "\n".join(lines[:number]) if number > 0 else post
    return post


def clean_post(post: str) -> str:
    """A post without its header, signature and quoted lines (in scikit-learn's order), whitespace collapsed to
    single spaces."""
    return " ".join(strip_quotes(strip_footer(strip_header(post))).split())
