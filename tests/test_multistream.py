"""Multistream Wikipedia dumps: a dump made of independent bz2 streams, with its index, read in parallel
ranges of streams gives exactly the pages and documents of reading it whole."""

from __future__ import annotations

import bz2
import re
from pathlib import Path

import pytest

from data_prep.corpus import plan_parts, write_corpus
from data_prep.errors import DataPrepError
from data_prep.readers import ReadStats, expand_inputs, iter_documents
from data_prep.wiki import iter_pages, multistream_index, stream_offsets, stream_ranges

PAGES_PER_STREAM = 10  # enwiki uses 100; the excerpt has 206 pages


def make_multistream(dump: Path, folder: Path) -> tuple[Path, Path]:
    """The dump re-compressed as enwiki publishes it: the header (<mediawiki>, <siteinfo>) in a stream of its
    own, then streams of PAGES_PER_STREAM pages, then the closing tag; and the index, `offset:page_id:title`
    per page, bz2-compressed beside it."""
    xml = bz2.decompress(dump.read_bytes())
    starts = [m.start() for m in re.finditer(rb"  <page>", xml)]
    end = xml.rindex(b"</mediawiki>")
    header, footer = xml[: starts[0]], xml[end:]
    pages = [xml[a:b] for a, b in zip(starts, starts[1:] + [end])]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "enwiki-test-pages-articles-multistream.xml.bz2"
    index_lines = []
    with open(path, "wb") as out:
        out.write(bz2.compress(header))
        for g in range(0, len(pages), PAGES_PER_STREAM):
            offset = out.tell()
            group = pages[g : g + PAGES_PER_STREAM]
            for page in group:
                page_id = re.search(rb"<id>(\d+)</id>", page).group(1).decode()
                title = re.search(rb"<title>(.*?)</title>", page).group(1).decode()
                index_lines.append(f"{offset}:{page_id}:{title}\n")
            out.write(bz2.compress(b"".join(group)))
        out.write(bz2.compress(footer))
    index = folder / "enwiki-test-pages-articles-multistream-index.txt.bz2"
    index.write_bytes(bz2.compress("".join(index_lines).encode()))
    return path, index


@pytest.fixture(scope="module")
def multistream(wiki_dump: Path, tmp_path_factory) -> tuple[Path, Path]:
    return make_multistream(wiki_dump, tmp_path_factory.mktemp("multistream"))


def test_ranges_of_streams_give_exactly_the_pages_of_the_whole_file(wiki_dump: Path, multistream) -> None:
    path, index = multistream
    assert multistream_index(path) == index
    offsets = stream_offsets(index)
    assert len(offsets) == 21  # 206 pages in streams of 10
    whole = list(iter_pages(wiki_dump))
    assert len(whole) == 206
    assert list(iter_pages(path)) == whole  # bz2 reads the concatenated streams as one
    for target in (1, 100_000, 400_000, path.stat().st_size):
        ranges = stream_ranges(path, index, target)
        assert ranges[0][0] == 0 and ranges[-1][1] == path.stat().st_size
        assert all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
        assert (len(ranges) == len(offsets)) == (target == 1)
        got = [page for r in ranges for page in iter_pages(path, r)]
        assert got == whole, target


def test_ranges_give_the_same_documents_and_counts(wiki_dump: Path, multistream) -> None:
    path, index = multistream
    # only the first ranges' worth of cleaning: the pages are already compared whole above
    ranges = stream_ranges(path, index, 1)[:4]
    first = [p for r in ranges for p in iter_pages(path, r)]
    stats = ReadStats()
    docs = [d for r in ranges for d in iter_documents(path, "auto", stats, r)]
    assert len(first) == 4 * PAGES_PER_STREAM and docs and stats.files == 1
    whole_stats = ReadStats()
    whole = []
    for doc in iter_documents(wiki_dump, "auto", whole_stats):
        whole.append(doc)
        if len(whole) == len(docs):
            break
    assert docs == whole


@pytest.mark.slow
def test_corpus_of_a_multistream_dump_in_parallel(wiki_corpus: Path, multistream) -> None:
    """Parts of a few streams each, two workers: the same corpus files as the single-stream excerpt read whole
    by one process (the session's corpus, 4 files)."""
    path, index = multistream
    parts = plan_parts(expand_inputs([path.parent]), "auto", 150_000)
    assert len(parts) > 4 and all(p.path == str(path) for p in parts)  # the index is not an input
    out = path.parent.parent / "corpus-2w"
    stats = write_corpus([path.parent], out, num_files=4, workers=2, progress=False, part_bytes=150_000)
    assert stats.files == 1
    for name in ("corpus-00000.txt", "corpus-00001.txt", "corpus-00002.txt", "corpus-00003.txt"):
        assert (out / name).read_bytes() == (wiki_corpus / name).read_bytes(), name


def test_index_of_another_file_is_refused(multistream, tmp_path: Path) -> None:
    path, index = multistream
    small = tmp_path / "small-multistream.xml.bz2"
    small.write_bytes(path.read_bytes()[:1000])
    (tmp_path / "small-multistream-index.txt.bz2").write_bytes(index.read_bytes())
    with pytest.raises(DataPrepError, match="lies beyond the end of"):
        plan_parts([small], "auto", 100)


def test_range_that_ends_inside_a_stream_is_an_error(multistream) -> None:
    path, index = multistream
    a, b = stream_ranges(path, index, 1)[3]
    with pytest.raises(DataPrepError, match=r"multistream\.xml\.bz2: truncated bz2"):
        list(iter_pages(path, (a, b - 10)))
