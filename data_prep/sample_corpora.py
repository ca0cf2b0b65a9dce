"""Sample corpora for the demo, the tests and the benchmarks: real text fetched at run time from a package that
ships it.

No third-party text is committed to this repository. gensim's wheel carries, as test data,
an excerpt of an English Wikipedia `pages-articles` dump (206 pages, ~100 of them real
articles), the Lee news corpus (300 stories, one per line), 200 labelled movie-review
sentences (Pang & Lee's sentence polarity, fastText format), two word-similarity sets
(WordSim-353 and SimLex-999: word pairs with human ratings) and 200 Usenet posts of two
newsgroups (a zlib-compressed pickle of a scikit-learn Bunch; `pipeline/probe_data.py` reads it
without running code it names). `pip download` fetches the
wheel without installing gensim; the files are extracted from it with zipfile and
cached. The wheel is pinned to one version and platform so every machine gets the same bytes,
which the SHA-256 checks confirm.

A larger English corpus, for benchmarks that must not exhaust their text: four public-domain SWORD modules packaged
for Debian (`sword_english`): the King James Version and the World English Bible, Matthew Henry's Concise Commentary
and the Scofield Reference Notes (1917). `apt-get download` fetches each package (pinned version, SHA-256 checked)
without installing it; `dpkg-deb -x` unpacks it; each module's zlib blocks (one per book of the Bible) are read,
their OSIS markup cleaned (notes, headings, milestones, Strong's number tags), and one document per book and
module is cached, in two files: training text and held-out text (the books of `HELDOUT_BOOKS`, in every module,
so that no translation of or commentary on a held-out book is trained on).
"""

from __future__ import annotations

import hashlib
import html
import logging
import os
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import DataPrepError

log = logging.getLogger(__name__)

GENSIM_VERSION = "4.4.0"
# Any wheel holds the same test data; pinning one keeps the download identical everywhere.
_WHEEL_TAGS = (
    "--platform",
    "manylinux_2_28_x86_64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
)
_REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class _Member:
    zip_path: str
    cache_name: str  # ".xml.bz2" so that format "auto" recognises the dump
    sha256: str  # of the file in the wheel
    encoding: str | None = None  # cached re-encoded as UTF-8 from this encoding; None: cached as it is


WIKIPEDIA_EXCERPT = _Member(
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    "enwiki-latest-pages-articles1-shortened.xml.bz2",
    "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
)
LEE_BACKGROUND = _Member(
    "gensim/test/test_data/lee_background.cor",
    "lee_background.txt",
    "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
)
# fastText format ("__label__neg text"); shipped in Windows-1252 (a few dashes and accents), cached as UTF-8.
PANG_LEE_POLARITY = _Member(
    "gensim/test/test_data/pang_lee_polarity.cor",
    "pang_lee_polarity.txt",
    "662c1b7c3bd0612eaaaf3f0c694cbd3897e30c0d87d2940b46c9fd0d15ed70c1",
    encoding="cp1252",
)
# "word1<TAB>word2<TAB>mean human rating" lines after two "#" comment lines; ratings 0-10.
WORDSIM353 = _Member(
    "gensim/test/test_data/wordsim353.tsv",
    "wordsim353.tsv",
    "f92a022fc2537793a15bc3a8c162ebcd74990e033a228bb6388cb71e4c0b1e1d",
)
SIMLEX999 = _Member(
    "gensim/test/test_data/simlex999.txt",
    "simlex999.tsv",
    "d5e0501971478a511430ee880bd0121e94ac701ba86d90544d83e6d2ba3db05d",
)
# 200 posts (alt.atheism and sci.space, 100 each) with their Usenet headers: a Python 2 pickle, zlib-compressed.
MINI_NEWSGROUP = _Member(
    "gensim/test/test_data/mini_newsgroup",
    "mini_newsgroup.pickle.zlib",
    "be0084ee9aded5eeefabea86bd23f0e5e3a743d9c1875aa1e47bc0728d6a5311",
)
_ALL = (WIKIPEDIA_EXCERPT, LEE_BACKGROUND, PANG_LEE_POLARITY, WORDSIM353, SIMLEX999, MINI_NEWSGROUP)


def default_cache_dir() -> Path:
    """$ALBERT_DATA_CACHE, else <repo>/.cache/corpora."""
    env = os.environ.get("ALBERT_DATA_CACHE")
    return Path(env) if env else _REPO / ".cache" / "corpora"


def wikipedia_excerpt(cache_dir: Path | None = None) -> Path:
    """Path of the English Wikipedia dump excerpt (.xml.bz2), downloading it on first use."""
    return _fetch(WIKIPEDIA_EXCERPT, cache_dir)


def lee_background(cache_dir: Path | None = None) -> Path:
    """Path of the Lee background corpus: 300 news stories, one per line (plain text)."""
    return _fetch(LEE_BACKGROUND, cache_dir)


def pang_lee_polarity(cache_dir: Path | None = None) -> Path:
    """Path of 200 movie-review sentences (Pang & Lee's polarity data), 100 `__label__neg` and 100 `__label__pos`,
    one per line in fastText format: the demo's downstream probe."""
    return _fetch(PANG_LEE_POLARITY, cache_dir)


def wordsim353(cache_dir: Path | None = None) -> Path:
    """Path of WordSim-353 (Finkelstein et al.): 353 word pairs rated for relatedness, tab-separated."""
    return _fetch(WORDSIM353, cache_dir)


def simlex999(cache_dir: Path | None = None) -> Path:
    """Path of SimLex-999 (Hill et al.): 999 word pairs rated for similarity (not relatedness), tab-separated."""
    return _fetch(SIMLEX999, cache_dir)


def mini_newsgroup(cache_dir: Path | None = None) -> Path:
    """Path of the 20-newsgroups sample: 200 posts of alt.atheism and sci.space, a zlib-compressed pickle (read it
    with `pipeline.probe_data.read_newsgroups`, never with a plain unpickler)."""
    return _fetch(MINI_NEWSGROUP, cache_dir)


def _fetch(member: _Member, cache_dir: Path | None) -> Path:
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / member.cache_name
    if target.is_file():
        log.debug("using cached %s", target)
        return target
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataPrepError(f"{cache_dir}: cannot create the cache directory ({exc.strerror or exc})") from None
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        wheel = _download_wheel(Path(tmp))
        # Extract every sample file while the wheel is here: one download serves them all.
        for m in _ALL:
            _extract(wheel, m, cache_dir)
    return target


def _download_wheel(dest: Path) -> Path:
    spec = f"gensim=={GENSIM_VERSION}"
    log.info("downloading the %s wheel (~28 MB) for its sample corpora (pip download --no-deps)", spec)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        *_WHEEL_TAGS,
        "--quiet",
        "--dest",
        str(dest),
        spec,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("gensim-*.whl"))
    if result.returncode != 0 or not wheels:
        lines = [ln for ln in (result.stderr or result.stdout).splitlines() if ln.strip()]
        reason = lines[-1].strip() if lines else f"exit status {result.returncode}"
        raise DataPrepError(f"pip download {spec}: failed to fetch the sample corpora ({reason})")
    return wheels[0]


def _extract(wheel: Path, member: _Member, cache_dir: Path) -> None:
    target = cache_dir / member.cache_name
    if target.is_file():
        return
    partial = cache_dir / f".{member.cache_name}.{os.getpid()}.tmp"
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member.zip_path) as src, open(partial, "wb") as dst:
            while block := src.read(1 << 20):
                digest.update(block)
                dst.write(block)
        if digest.hexdigest() != member.sha256:
            raise DataPrepError(f"{wheel.name}: {member.zip_path} has an unexpected SHA-256 ({digest.hexdigest()})")
        if member.encoding is not None:
            partial.write_text(partial.read_bytes().decode(member.encoding), encoding="utf-8")
        os.replace(partial, target)  # atomic: readers never see a half-written file
    except (KeyError, zipfile.BadZipFile) as exc:
        raise DataPrepError(f"{wheel.name}: cannot extract {member.zip_path} ({exc})") from None
    finally:
        partial.unlink(missing_ok=True)
    size = target.stat().st_size
    log.info("cached %s (%s)", target, f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB")


@dataclass(frozen=True)
class SwordPackage:
    """A Debian package holding one SWORD module (OSIS markup, zlib blocks of one book each)."""

    package: str
    version: str
    sha256: str  # of the .deb
    module_dir: str  # the module's folder inside the package


SWORD_PACKAGES = (
    SwordPackage(
        "sword-text-kjv",
        "14.3-1",
        "9f463f28ce665f6f528fc723179722bced880a4c5485f7a41bf742838315de57",
        "usr/share/sword/modules/texts/ztext/engKJV2006eb",
    ),
    SwordPackage(
        "sword-text-web",
        "426.0-1",
        "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1",
        "usr/share/sword/modules/texts/ztext/engWEB2015eb",
    ),
    SwordPackage(
        "sword-comm-mhcc",
        "2.0-1",
        "06f748215de78ff48fdfdee93e3ffc5af6318b976485f7aedf22309236967e35",
        "usr/share/sword/modules/comments/zcom/mhcc",
    ),
    SwordPackage(
        "sword-comm-scofield",
        "2.1-1",
        "0c11a9533d4870ec40cc72792ecde8aae6e4cc00eca12301150aac018fd5dfcb",
        "usr/share/sword/modules/comments/zcom/scofield",
    ),
)
# Held out of training in every module (text and commentary alike): Old and New Testament, law, history, poetry,
# prophecy, gospel and letter, about a tenth of the text.
HELDOUT_BOOKS = ("Num", "2Sam", "Job", "Ezek", "Mark", "Rom", "Heb")
SWORD_ENGLISH_TRAIN = "sword-english-train.txt"
SWORD_ENGLISH_HELDOUT = "sword-english-heldout.txt"


@dataclass(frozen=True)
class SwordEnglish:
    """The cached corpus: "paragraphs" format files (a paragraph a line, a blank line after each document)."""

    train: Path
    heldout: Path


def sword_english(cache_dir: Path | None = None) -> SwordEnglish:
    """Training and held-out text of the four SWORD modules (about 16 MB), downloading them on first use."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    corpus = SwordEnglish(cache_dir / SWORD_ENGLISH_TRAIN, cache_dir / SWORD_ENGLISH_HELDOUT)
    if corpus.train.is_file() and corpus.heldout.is_file():
        log.debug("using cached %s and %s", corpus.train, corpus.heldout)
        return corpus
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataPrepError(f"{cache_dir}: cannot create the cache directory ({exc.strerror or exc})") from None
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        books = []
        for pkg in SWORD_PACKAGES:
            deb = _download_deb(pkg, Path(tmp))
            check_sha256(deb, pkg.sha256)
            unpacked = Path(tmp) / pkg.package
            _unpack_deb(deb, unpacked)
            books += [(pkg.package, book, text) for book, text in sword_books(unpacked / pkg.module_dir)]
        for target, held in ((corpus.train, False), (corpus.heldout, True)):
            partial = Path(tmp) / target.name
            with open(partial, "w", encoding="utf-8") as out:
                for _, book, osis in books:
                    if (book in HELDOUT_BOOKS) == held and (paragraphs := clean_osis(osis)):
                        out.write("\n".join(paragraphs) + "\n\n")
            os.replace(partial, target)  # atomic: readers never see a half-written file
            log.info("cached %s (%.1f MB)", target, target.stat().st_size / 1e6)
    return corpus


def check_sha256(path: Path, expected: str) -> None:
    """Refuse a downloaded file whose SHA-256 is not the pinned one."""
    digest = hashlib.sha256()
    with open(path, "rb") as src:
        while block := src.read(1 << 20):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise DataPrepError(f"{path}: unexpected SHA-256 {digest.hexdigest()} (pinned: {expected}); refused")


def _download_deb(pkg: SwordPackage, dest: Path) -> Path:
    spec = f"{pkg.package}={pkg.version}"
    log.info("downloading %s (apt-get download)", spec)
    result = subprocess.run(["apt-get", "download", spec], cwd=dest, capture_output=True, text=True)
    debs = sorted(dest.glob(f"{pkg.package}_*.deb"))
    if result.returncode != 0 or not debs:
        lines = [ln for ln in (result.stderr or result.stdout).splitlines() if ln.strip() and not ln.startswith("W:")]
        reason = lines[-1].strip() if lines else f"exit status {result.returncode}"
        raise DataPrepError(f"apt-get download {spec}: failed to fetch the sample corpus ({reason})")
    return debs[0]


def _unpack_deb(deb: Path, dest: Path) -> None:
    result = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
    if result.returncode != 0:
        raise DataPrepError(f"{deb}: dpkg-deb -x failed ({result.stderr.strip() or result.returncode})")


_BOOK_DIV = re.compile(r'<div\b[^>]*\btype="book"[^>]*>')
_OSIS_ID = re.compile(r'\bosisID="([^"]+)"')


def sword_books(module_dir: Path) -> Iterator[tuple[str, str]]:
    """(book's OSIS id, its OSIS text) for each book of a zText/zCom module, in the module's order. The block index
    (`.bzs`: offset, compressed and uncompressed size, 32-bit little-endian) locates zlib blocks in `.bzz`; a book
    starts at its <div type="book" osisID=...> and may span blocks or share one. Text before the first book
    (module and testament introductions) is not read."""
    book, parts = "", []
    for testament in ("ot", "nt"):
        index_path, blocks_path = module_dir / f"{testament}.bzs", module_dir / f"{testament}.bzz"
        if not index_path.is_file():
            continue
        index, blocks = index_path.read_bytes(), blocks_path.read_bytes()
        if len(index) % 12:
            raise DataPrepError(f"{index_path}: {len(index)} bytes, not a whole number of 12-byte entries")
        for entry in range(len(index) // 12):
            offset, size, _ = struct.unpack_from("<III", index, entry * 12)
            if size == 0:
                continue
            try:
                text = zlib.decompress(blocks[offset : offset + size]).decode("utf-8")
            except (zlib.error, UnicodeDecodeError) as exc:
                raise DataPrepError(f"{blocks_path}: block {entry} does not decompress ({exc})") from None
            start = 0
            for div in _BOOK_DIV.finditer(text):
                if "eID=" in div.group(0):  # a book's closing milestone
                    continue
                if book:
                    parts.append(text[start : div.start()])
                    yield book, "".join(parts)
                found = _OSIS_ID.search(div.group(0))
                book, parts, start = (found.group(1) if found else ""), [], div.start()
            if book:
                parts.append(text[start:])
    if book:
        yield book, "".join(parts)


# Removed with their content: notes (footnotes, cross references) and headings, which are not running prose.
_DROPPED_ELEMENTS = re.compile(r"<(note|title)\b[^>]*(?<!/)>.*?</\1>", re.DOTALL)
# Markers that start a new paragraph: paragraph and chapter starts, line breaks and line groups of poetry.
_BREAKS = re.compile(r'<(?:div\b[^>]*\btype="(?:x-p|paragraph)"|p\b|/p>|chapter\b|lb\b|lg\b|/lg>|l\b)[^>]*>')
_TAG = re.compile(r"<[^>]*>")
# Back matter opens with its <div type="glossary">: a book's running text ends there.
_BACK_MATTER = re.compile(r'<div\b[^>]*\btype="glossary"')
# A paragraph that states the text's licence or copyright (the World English Bible's glossary ends with one; Project
# Gutenberg's headers and footers are made of them) is not prose of the work.
_LICENCE_NOTICE = re.compile(r"\b(?:public domain|copyright|all rights reserved|project gutenberg)\b", re.IGNORECASE)


def clean_osis(osis: str) -> list[str]:
    """The paragraphs of running text in OSIS markup: notes and headings dropped with their text, every other tag
    (words tagged with Strong's numbers, references, milestones) replaced by its text, entities decoded; back matter
    (a glossary) and paragraphs stating a licence or copyright are left out."""
    back_matter = _BACK_MATTER.search(osis)
    text = _DROPPED_ELEMENTS.sub(" ", osis[: back_matter.start()] if back_matter else osis)
    text = _BREAKS.sub("\n", text)
    text = html.unescape(_TAG.sub("", text))
    paragraphs = (" ".join(line.split()) for line in text.split("\n"))
    return [p for p in paragraphs if p and not _LICENCE_NOTICE.search(p)]
