"""Wikipedia `pages-articles` dumps: streaming page reader and wikitext → prose cleaning.

Reading (`iter_pages`: bz2 + XML, ~20 MB/s, bz2 being most of it) is cheap; cleaning
(`clean_wikitext`, ~3 MB/s of XML per core, mostly mwparserfromhell's parse) is the expensive part.
A multistream dump (`…-multistream.xml.bz2`, published with `…-multistream-index.txt.bz2`, whose
lines are `offset:page_id:title`) is a concatenation of bz2 streams of ~100 pages each that
decompress independently: `stream_ranges` cuts it at stream offsets into ranges that separate
processes read in parallel (`iter_pages(path, streams=range)`), giving the same pages as reading
the file whole.

Cleaning rules (each is tested in tests/test_wiki.py):
- comments, <ref>…</ref> and <ref/> are removed before parsing (a regex pass: references
  hold ~30% of article bytes and most templates, and skipping them halves the parse time);
- templates are dropped, except a few inline ones that carry prose (`convert`, `lang`,
  `nowrap`, …: see `_template_text`);
- tags whose content is not prose (tables, galleries, math, <pre>, timelines, …) are
  dropped with their content; other tags (sup, span, code, blockquote…) keep their text;
  bold/italic quotes and list markers are stripped;
- wikilinks become their visible text; File:/Image:/Media:/Category: links, other
  namespaces and interlanguage links (`[[de:…]]`) are dropped; sister-project links
  (`[[wikt:word|word]]`) keep their text since they render inline;
- external links keep their label, bare URLs are dropped; HTML entities are decoded;
- headings are dropped, and so are whole "References", "External links", "See also",
  "Further reading"… sections (lists of citations and links, not prose);
- a line survives only if it looks like prose: at least `MIN_WORDS` words, no leftover
  markup (`{{`, `[[`, `{|`, `|}`, `<ref`), not a table row or image-option leftover, and for
  list items, ending like a sentence (lists of names or links are not prose).
"""

from __future__ import annotations

import bz2
import html
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import mwparserfromhell
from mwparserfromhell.nodes import (
    Comment,
    ExternalLink,
    Heading,
    HTMLEntity,
    Node,
    Tag,
    Template,
    Text,
    Wikilink,
)

from data_prep.compressed import DECOMPRESSION_ERRORS, compression, decompression_error, open_input
from data_prep.errors import DataPrepError

log = logging.getLogger(__name__)

# Fewer words than this is a caption, a stub line or a label, not prose.
MIN_WORDS = 5

_COMMENT_RE = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
# Self-closing refs first; an unclosed <ref> is left to the parser (and the leftover filter).
_REF_RE = re.compile(r"<ref\b[^>]*?/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_REDIRECT_RE = re.compile(r"\s*#redirect\b", re.I)
# {{disambiguation}}, {{Disambiguation|geo}}, {{dab}}, {{disambig}}, {{hndis}}, {{geodis}},
# {{Place name disambiguation}}, {{numberdis}}…  ({{disambiguation needed}} does not match.)
_DISAMBIG_RE = re.compile(
    r"\{\{\s*(?:[\w -]{0,40}\s)?(?:disambiguation|disambig|disamb|dab|[\w-]{0,20}dis)\s*(?:\|[^{}]*)?\}\}",
    re.I,
)

# Sections after these headings are citations and link lists.
_SKIP_SECTIONS = frozenset(
    {
        "references",
        "external links",
        "see also",
        "further reading",
        "notes",
        "bibliography",
        "sources",
        "citations",
        "footnotes",
        "notes and references",
        "references and notes",
        "works cited",
        "gallery",
        "links",
    }
)
# Tags whose whole content is not prose.
_DROP_TAGS = frozenset(
    {
        "ref",
        "references",
        "table",
        "gallery",
        "math",
        "chem",
        "ce",
        "score",
        "pre",
        "syntaxhighlight",
        "source",
        "timeline",
        "imagemap",
        "graph",
        "mapframe",
        "maplink",
        "templatedata",
        "hiero",
        "inputbox",
        "categorytree",
        "noinclude",
        "includeonly",
        "indicator",
        "ul",
        "ol",
    }
)
_LIST_TAGS = frozenset({"li", "dt", "dd"})
_BREAK_TAGS = frozenset({"br", "hr", "p", "blockquote", "poem", "div", "center"})
# Link prefixes that hide the link entirely (media, categories, project pages).
_DROP_NAMESPACES = frozenset(
    {
        "file",
        "image",
        "media",
        "category",
        "template",
        "wikipedia",
        "wp",
        "project",
        "help",
        "portal",
        "user",
        "user talk",
        "talk",
        "special",
        "mediawiki",
        "module",
        "draft",
        "book",
        "timedtext",
        "gadget",
        "topic",
    }
)
# Sister projects render inline with their label: keep the text.
_SISTER_PROJECTS = frozenset(
    {
        "wikt",
        "wiktionary",
        "s",
        "wikisource",
        "q",
        "wikiquote",
        "b",
        "wikibooks",
        "n",
        "wikinews",
        "v",
        "wikiversity",
        "voy",
        "wikivoyage",
        "species",
        "wikispecies",
        "commons",
        "c",
        "d",
        "wikidata",
        "m",
        "meta",
        "mw",
        "w",
    }
)
# Interlanguage prefixes are written in lower case: "de", "fr", "zh-min-nan", "simple".
_LANG_PREFIX_RE = re.compile(r"[a-z]{2,3}(?:-[a-z]{2,8})*|simple")

# Templates that stand for one character or short string.
_SYMBOL_TEMPLATES = {
    "mdash": "—",
    "mdashb": "—",
    "ndash": "–",
    "snd": " – ",
    "spaced ndash": " – ",
    "nbsp": " ",
    "'": "'",
    "'s": "'s",
    "-": "-",
    "=": "=",
}

_LIST_MARK = "\ue000"  # private-use sentinel: "this line was a list item"
_LEFTOVER_MARKUP = ("{{", "}}", "[[", "]]", "{|", "|}", "<ref", "</ref")
_TABLE_LINE_RE = re.compile(r"^(?:\{\||\|[-}+]?|!)")
_IMAGE_LEFTOVER_RE = re.compile(
    r"^(?:thumb|thumbnail|frame|frameless|upright|left|right|center|\d+px)\s*\||\|\s*thumb\s*\||^(?:file|image):",
    re.I,
)
_BOLD_ITALIC_RE = re.compile(r"'{2,}")
_EMPTY_PARENS_RE = re.compile(r"\(\s*[,;:]?\s*\)")
_PAREN_LEAD_PUNCT_RE = re.compile(r"\(\s*[,;:]\s*")
_REPEATED_COMMA_RE = re.compile(r"(?:\s*,)+")
_SPACE_BEFORE_PUNCT_RE = re.compile(r"\s+([,.;:!?)\]])")
_SPACE_AFTER_OPEN_RE = re.compile(r"([(\[])\s+")
_SENTENCE_END_RE = re.compile(r"[.!?][\"'”’)\]]*$")


@dataclass(frozen=True, slots=True)
class WikiPage:
    title: str
    ns: int
    redirect: bool
    text: str


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def iter_pages(path: Path, streams: tuple[int, int] | None = None) -> Iterator[WikiPage]:
    """Stream the pages of a `.xml` dump (or `.xml.bz2`, `.gz`, `.xz`), keeping one page in memory at a time.
    `streams`: only the bz2 streams in this byte range of a multistream dump (from stream_ranges).

    A truncated or corrupt file raises DataPrepError naming the file, not a traceback; so do bytes
    that are not UTF-8, with the offset of the first one.
    """
    path = Path(path)
    try:
        with open(path, "rb") if streams is not None else open_input(path) as raw:
            source = _StreamPages(raw, *streams) if streams is not None else raw
            checked = _Utf8Checked(source, path, 0 if streams is None else None)
            context = ET.iterparse(checked, events=("start", "end"))
            root = None
            for event, elem in context:
                if root is None:
                    root = elem
                if event != "end" or _local(elem.tag) != "page":
                    continue
                yield _page_from_element(elem)
                # Clearing the root drops the finished page (and earlier siblings) so
                # memory stays flat however many pages the dump has.
                root.clear()
    except ET.ParseError as exc:
        where = "" if streams is None else f" in the bz2 streams at bytes {streams[0]}-{streams[1]}"
        raise DataPrepError(f"{path}: corrupt or truncated XML{where} ({exc})") from None
    except FileNotFoundError:
        raise DataPrepError(f"{path}: no such file or directory") from None
    except DECOMPRESSION_ERRORS as exc:
        if compression(path) or streams is not None:
            raise decompression_error(path, exc) from None
        raise DataPrepError(f"{path}: cannot read ({exc})") from None


class _Utf8Checked:
    """Passes bytes through to the XML parser, refusing NUL bytes and invalid UTF-8 with the offset of
    the first bad byte (the parser would only say "not well-formed" with a line and column).
    `base`: the offset of the first byte, or None where offsets are not file offsets (stream ranges)."""

    def __init__(self, stream, path: Path, base: int | None):
        import codecs

        self._stream, self._path, self._base = stream, path, base
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._read = 0

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        nul = data.find(b"\0")
        bad = None
        if nul >= 0:
            bad = (self._read + nul, "NUL byte")
        else:
            try:
                self._decoder.decode(data, final=not data)
            except UnicodeDecodeError as exc:
                bad = (self._read - len(exc.object) + len(data) + exc.start, "byte that is not UTF-8")
        if bad is not None:
            offset, what = bad
            where = (
                f"{what} at byte offset {offset}{' of the decompressed data' if compression(self._path) else ''}"
                if self._base is not None
                else f"{what} in the decompressed streams"
            )
            raise DataPrepError(f"{self._path}: {where}: not UTF-8 XML")
        self._read += len(data)
        return data


# Raw bytes read at a time from a multistream dump; bz2 blocks are at most 900 kB, so one read
# decompresses to a few MB at most.
_RAW_READ = 1 << 20
_PAGE_OPEN, _PAGE_CLOSE = b"<page>", b"</page>"


class _StreamPages:
    """The bz2 streams in bytes [start, stop) of a multistream dump, decompressed and cut to whole
    <page> elements inside one root element: the dump's own header (<mediawiki>, <siteinfo>) and
    its closing tag are in streams of their own, and only pages matter. `<page>` cannot occur in
    the text of an XML document (a "<" in text is escaped), so cutting at it is exact."""

    def __init__(self, raw: BinaryIO, start: int, stop: int):
        raw.seek(start)
        self._raw, self._left = raw, stop - start
        self._decompressor: bz2.BZ2Decompressor | None = None
        self._carry = b""
        self._started = False
        self._out = bytearray(b"<pages>")
        self._ended = False

    def _decompress(self) -> bytes:
        """The next decompressed bytes; b"" once the range is read."""
        if self._left <= 0:
            if self._decompressor is not None:
                raise EOFError("a bz2 stream runs past the end of the range")
            return b""
        data = self._raw.read(min(_RAW_READ, self._left))
        if not data:
            raise EOFError("the file ends inside the range")
        self._left -= len(data)
        out = []
        while data:
            if self._decompressor is None:
                self._decompressor = bz2.BZ2Decompressor()
            out.append(self._decompressor.decompress(data))
            if self._decompressor.eof:  # one stream done: the rest belongs to the next
                data = self._decompressor.unused_data
                self._decompressor = None
            else:
                data = b""
        return b"".join(out)

    def _fill(self) -> None:
        while not self._out and not self._ended:
            data = self._decompress()
            if not data and self._left <= 0:
                rest = self._carry.strip() if self._started else b""  # before the first page: the header
                if rest not in (b"", b"</mediawiki>"):
                    raise EOFError(f"the range ends inside a page ({len(rest)} bytes after the last </page>)")
                self._out += b"</pages>"
                self._ended = True
                return
            buf = self._carry + data
            if not self._started:
                i = buf.find(_PAGE_OPEN)
                if i < 0:
                    self._carry = buf[-len(_PAGE_OPEN) :]
                    continue
                buf, self._started = buf[i:], True
            j = buf.rfind(_PAGE_CLOSE)
            if j < 0:
                self._carry = buf
            else:
                self._out += buf[: j + len(_PAGE_CLOSE)]
                self._carry = buf[j + len(_PAGE_CLOSE) :]

    def read(self, n: int = -1) -> bytes:
        self._fill()
        n = len(self._out) if n is None or n < 0 else n
        data = bytes(self._out[:n])
        del self._out[:n]
        return data


def multistream_index(path: Path) -> Path | None:
    """The index published beside a multistream dump: `X-multistream.xml.bz2` -> `X-multistream-index.txt.bz2`
    (or `.txt`); None when there is none."""
    name = Path(path).name
    if not name.endswith(".xml.bz2"):
        return None
    stem = name[: -len(".xml.bz2")]
    for suffix in ("-index.txt.bz2", "-index.txt"):
        index = Path(path).with_name(stem + suffix)
        if index.is_file():
            return index
    return None


def stream_offsets(index: Path) -> list[int]:
    """The distinct stream offsets of a multistream index (`offset:page_id:title` per line), in order."""
    offsets: list[int] = []
    try:
        with open_input(index) as f:
            for lineno, line in enumerate(f, 1):
                head = line.split(b":", 1)[0]
                if not head.isdigit():
                    if not line.strip():
                        continue
                    raise DataPrepError(f"{index}:{lineno}: not an `offset:page_id:title` line of a multistream index")
                offset = int(head)
                if not offsets or offset != offsets[-1]:
                    if offsets and offset < offsets[-1]:
                        raise DataPrepError(
                            f"{index}:{lineno}: stream offsets go backwards ({offset} after {offsets[-1]})"
                        )
                    offsets.append(offset)
    except DECOMPRESSION_ERRORS as exc:
        raise decompression_error(index, exc) from None
    return offsets


def stream_ranges(path: Path, index: Path, target: int) -> list[tuple[int, int]]:
    """Byte ranges of about `target` compressed bytes covering a multistream dump, each cut at a stream
    offset of the index. The first starts at 0 (the dump's header stream) and the last ends at the end of
    the file; the header stream before the first indexed one goes with the first range. They depend on the
    dump, its index and `target` alone."""
    size = Path(path).stat().st_size
    offsets = stream_offsets(index)
    if offsets and offsets[-1] >= size:
        raise DataPrepError(
            f"{index}: stream offset {offsets[-1]} lies beyond the end of {path} ({size} bytes): not its index"
        )
    cuts = [0]
    for offset in offsets[1:]:
        if offset - cuts[-1] >= target:
            cuts.append(offset)
    return list(zip(cuts, cuts[1:] + [size]))


def _page_from_element(page: ET.Element) -> WikiPage:
    title, ns, redirect, text = "", 0, False, ""
    for child in page:
        name = _local(child.tag)
        if name == "title":
            title = child.text or ""
        elif name == "ns":
            try:
                ns = int(child.text or 0)
            except ValueError:
                ns = -1
        elif name == "redirect":
            redirect = True
        elif name == "revision":
            for field in child:
                if _local(field.tag) == "text":
                    text = field.text or ""
    return WikiPage(title=title, ns=ns, redirect=redirect, text=text)


def skip_reason(page: WikiPage) -> str | None:
    """Why a page is not an article ("namespace", "redirect", "disambiguation"), or None."""
    if page.ns != 0:
        return "namespace"
    if page.redirect or _REDIRECT_RE.match(page.text):
        return "redirect"
    if page.title.rstrip().endswith("(disambiguation)") or _DISAMBIG_RE.search(page.text):
        return "disambiguation"
    return None


def clean_wikitext(text: str) -> list[str]:
    """The prose paragraphs of an article's wikitext, markup removed, one string per line."""
    text = _REF_RE.sub("", _COMMENT_RE.sub("", text))
    out: list[str] = []
    skip_level = 0  # > 0 while inside a skipped section of that heading level
    # skip_style_tags: unbalanced '' is common and derails the parser; the quotes are
    # stripped from the text instead (and parsing gets ~10% faster).
    for node in mwparserfromhell.parse(text, skip_style_tags=True).nodes:
        if isinstance(node, Heading):
            title = node.title.strip_code().strip().lower()
            if skip_level and node.level > skip_level:
                continue
            skip_level = node.level if title in _SKIP_SECTIONS else 0
            out.append("\n\n")
        elif not skip_level:
            _render(node, out)
    return [p for p in (_clean_line(line) for line in "".join(out).split("\n")) if p]


def _render_all(nodes: Iterable[Node], out: list[str]) -> None:
    for node in nodes:
        _render(node, out)


def _render(node: Node, out: list[str]) -> None:
    if isinstance(node, Text):
        out.append(node.value)
    elif isinstance(node, Wikilink):
        _render_link(node, out)
    elif isinstance(node, Tag):
        _render_tag(node, out)
    elif isinstance(node, HTMLEntity):
        try:
            out.append(node.normalize())
        except ValueError:  # an invalid entity such as &#99999999;
            pass
    elif isinstance(node, ExternalLink):
        if node.title is not None:
            _render_all(node.title.nodes, out)
    elif isinstance(node, Template):
        out.append(_template_text(node))
    elif isinstance(node, Heading):  # nested inside a tag: keep it out of the prose
        out.append("\n\n")
    elif isinstance(node, Comment):
        pass
    # Argument nodes ({{{1}}}) only make sense inside templates: dropped.


def _render_link(node: Wikilink, out: list[str]) -> None:
    title = str(node.title).strip()
    leading_colon = title.startswith(":")
    if leading_colon:
        title = title[1:].lstrip()
    if ":" in title:
        prefix = title.split(":", 1)[0].strip()
        low = prefix.lower()
        if low in _SISTER_PROJECTS:
            if node.text is not None:
                _render_all(node.text.nodes, out)
            return
        if low in _DROP_NAMESPACES or (_LANG_PREFIX_RE.fullmatch(prefix) and not leading_colon):
            return
    if node.text is not None:
        _render_all(node.text.nodes, out)
    elif not title.startswith("#"):
        out.append(html.unescape(title))


def _render_tag(node: Tag, out: list[str]) -> None:
    name = str(node.tag).strip().lower()
    if name in _DROP_TAGS:
        return
    if name in _LIST_TAGS:
        if node.wiki_markup:  # "*", "#", ":", ";": the item's text follows as sibling nodes
            out.append(_LIST_MARK)
        elif node.contents is not None:
            out.append("\n" + _LIST_MARK)
            _render_all(node.contents.nodes, out)
            out.append("\n")
        return
    breaks = name in _BREAK_TAGS
    if breaks:
        out.append("\n")
    if node.contents is not None and not node.self_closing:
        _render_all(node.contents.nodes, out)
    if breaks:
        out.append("\n")


def _positional(node: Template) -> list[str]:
    return [p.value.strip_code().strip() for p in node.params if not p.showkey]


def _template_text(node: Template) -> str:
    """Text of the few inline templates that carry prose; empty for all others."""
    name = str(node.name).strip().lower().replace("_", " ")
    if name in _SYMBOL_TEMPLATES:
        return _SYMBOL_TEMPLATES[name]
    if name == "as of":
        args = _positional(node)
        lower = any(str(p.name).strip() == "lc" for p in node.params if p.showkey)
        return ("as of " if lower else "As of ") + args[0] if args else ""
    if name in ("convert", "cvt"):
        args = _positional(node)
        if len(args) >= 4 and args[1] in ("-", "–", "to", "and", "or", "by", "x", "×"):
            return " ".join(args[:4])
        return " ".join(args[:2])
    if name in ("lang", "transl", "transliteration"):
        args = _positional(node)
        return args[-1] if len(args) >= 2 else ""
    if name.startswith("lang-") or name in (
        "nowrap",
        "nobr",
        "small",
        "smaller",
        "big",
        "nobold",
        "noitalic",
        "sic",
        "vanchor",
        "em",
        "strong",
        "angbr",
        "nihongo",
        "korean",
        "zh",
    ):
        args = _positional(node)
        return args[0] if args else ""
    return ""


def _clean_line(line: str) -> str:
    is_list = line.startswith(_LIST_MARK)
    line = line.replace(_LIST_MARK, " ")
    line = " ".join(line.split())
    if not line or any(m in line for m in _LEFTOVER_MARKUP):
        return ""
    if _TABLE_LINE_RE.match(line) or _IMAGE_LEFTOVER_RE.search(line):
        return ""
    line = _BOLD_ITALIC_RE.sub("", line)
    line = _EMPTY_PARENS_RE.sub("", line)
    line = _PAREN_LEAD_PUNCT_RE.sub("(", line)
    line = _REPEATED_COMMA_RE.sub(",", line)
    line = _SPACE_BEFORE_PUNCT_RE.sub(r"\1", line)
    line = _SPACE_AFTER_OPEN_RE.sub(r"\1", line)
    line = " ".join(line.split())
    if len(line.split()) < MIN_WORDS:
        return ""
    if is_list and not _SENTENCE_END_RE.search(line):
        return ""
    return line
