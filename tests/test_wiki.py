"""Wikipedia dumps: page streaming, page skipping, and exactly what text survives cleaning."""

from __future__ import annotations

import bz2
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

from data_prep.errors import DataPrepError
from data_prep.readers import ReadStats, iter_documents
from data_prep.wiki import WikiPage, clean_wikitext, iter_pages, skip_reason

ARTICLE = """{{Short description|A test article}}
{{Infobox thing
| name = Widget
| image = Widget.png
| population = {{convert|5|km}}
}}
[[File:Widget.jpg|thumb|left|A widget on a [[table]], seen from above.]]
'''Widget''' ({{IPAc-en|ˈ|w|ɪ|dʒ|ɪ|t}}) is a small [[Device (machine)|device]] used in [[economics]].<ref>{{cite book |title=Widgets |year=1999}}</ref> It is about {{convert|5|cm|in}} long.<ref name="size" />

Widgets were first described in 1920 by [[John Smith (economist)|John Smith]]<!-- hidden note --> and ''The Widget Review'' &amp; others.{{citation needed|date=May 2020}}

== History ==
The earliest widgets were made of wood&nbsp;and brass.<ref name="wood">Wooden widgets, ''Journal of Things'', 1921.</ref> See [[wikt:widget|the word widget]] for the etymology.

{| class="wikitable"
|-
! Year !! Widgets made in the factory
|-
| 1920 || 5 thousand widgets were made that year
|}

* A list item that is a full sentence about widgets.
* [[Gadget]]
# Short item

The [[Category:Tools|tools]] category link and the [[de:Widget]] interlanguage link vanish entirely here.
Prices rose in [[1990s|the 1990s]] according to [http://example.org/report the annual report] and http://example.org/bare too.

== References ==
{{reflist}}
* Smith, John (1920). A Long Book About Widgets Of All Kinds. Publisher.

== External links ==
* [http://example.org Official widget site with many widgets]

[[Category:Widgets]]
[[fr:Widget]]
"""

EXPECTED_ARTICLE = [
    "Widget is a small device used in economics.",
    "It is about 5 cm long.",
    "Widgets were first described in 1920 by John Smith and The Widget Review & others.",
    "The earliest widgets were made of wood and brass.",
    "See the word widget for the etymology.",
    "A list item that is a full sentence about widgets.",
    "The category link and the interlanguage link vanish entirely here.",
    "Prices rose in the 1990s according to the annual report and too.",
]


def _page(title: str, text: str, ns: int = 0, redirect: str | None = None) -> str:
    red = f'    <redirect title="{escape(redirect)}" />\n' if redirect else ""
    return (
        f"  <page>\n    <title>{escape(title)}</title>\n    <ns>{ns}</ns>\n    <id>1</id>\n{red}"
        f"    <revision>\n      <id>2</id>\n      <model>wikitext</model>\n"
        f'      <text xml:space="preserve">{escape(text)}</text>\n    </revision>\n  </page>\n'
    )


def make_dump() -> str:
    pages = [
        _page("Widgets", "#REDIRECT [[Widget]]", redirect="Widget"),
        _page("Widget", ARTICLE),
        _page("Gizmo", "#redirect [[Widget]]\n{{R from alternative name}}"),  # no <redirect> element
        _page("Widget (disambiguation)", "'''Widget''' may refer to:\n* [[Widget]], a small device used in economics."),
        _page("Sprocket", "'''Sprocket''' may refer to several different things in engineering.\n\n{{dab}}"),
        _page("Smith", "'''Smith''' is a surname shared by many different people.\n{{hndis|Smith}}"),
        _page("Talk:Widget", "This talk page discussion is about the widget article.", ns=1),
        _page("Empty", "{{Infobox thing|name=Empty}}\n[[Category:Stubs]]"),
        _page("Gear", "A '''gear''' is a rotating machine part with cut teeth.{{Disambiguation needed|date=May 2020}}"),
    ]
    return (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">\n'
        "  <siteinfo><sitename>Wikipedia</sitename></siteinfo>\n" + "".join(pages) + "</mediawiki>\n"
    )


@pytest.fixture
def dump(tmp_path: Path) -> Path:
    path = tmp_path / "dump.xml"
    path.write_text(make_dump(), encoding="utf-8")
    return path


def test_dump_yields_exactly_the_clean_articles(dump: Path) -> None:
    stats = ReadStats()
    docs = list(iter_documents(dump, "auto", stats))
    assert docs == [EXPECTED_ARTICLE, ["A gear is a rotating machine part with cut teeth."]]
    # two redirects, two disambiguation pages, one hndis, one talk page
    assert stats.skipped_pages == 6
    assert stats.empty_documents == 1  # "Empty": nothing but an infobox and a category
    assert (stats.files, stats.documents, stats.sentences) == (1, 2, len(EXPECTED_ARTICLE) + 1)


def test_bz2_dump_reads_the_same(dump: Path, tmp_path: Path) -> None:
    packed = tmp_path / "dump.xml.bz2"
    packed.write_bytes(bz2.compress(dump.read_bytes()))
    assert list(iter_documents(packed)) == list(iter_documents(dump))


def test_iter_pages_fields(dump: Path) -> None:
    pages = list(iter_pages(dump))
    assert [p.title for p in pages][:3] == ["Widgets", "Widget", "Gizmo"]
    assert pages[0].redirect and not pages[1].redirect
    assert pages[6].ns == 1
    assert pages[1].text == ARTICLE  # entities in the XML decoded once, text otherwise untouched


@pytest.mark.parametrize(
    ("title", "text", "ns", "reason"),
    [
        ("A", "text", 1, "namespace"),
        ("A", "#REDIRECT [[B]]", 0, "redirect"),
        ("A (disambiguation)", "A may be:", 0, "disambiguation"),
        ("A", "x\n{{disambiguation}}", 0, "disambiguation"),
        ("A", "x\n{{Disambiguation|geo|hndis}}", 0, "disambiguation"),
        ("A", "x\n{{disambig}}", 0, "disambiguation"),
        ("A", "x\n{{geodis}}", 0, "disambiguation"),
        ("A", "x\n{{Place name disambiguation}}", 0, "disambiguation"),
        ("A", "x{{disambiguation needed|date=2020}}", 0, None),
        ("A", "{{About|the city|other uses|A (disambiguation)}} text", 0, None),
    ],
)
def test_skip_reason(title: str, text: str, ns: int, reason: str | None) -> None:
    assert skip_reason(WikiPage(title=title, ns=ns, redirect=False, text=text)) == reason


@pytest.mark.parametrize(
    ("wikitext", "expected"),
    [
        # references, with and without content, with templates inside
        ("One two three four five.<ref>A {{cite|x}} ref.</ref> Six.<ref name=a/>", ["One two three four five. Six."]),
        # nested templates vanish, inline prose templates keep their text
        (
            "{{a|{{b|c}}}}It is {{convert|3|-|5|km}} wide and {{lang|fr|très}} nice.",
            ["It is 3 - 5 km wide and très nice."],
        ),
        (
            "Born {{as of|2010|lc=y}} in the city{{mdash}}a large one, they say.",
            ["Born as of 2010 in the city—a large one, they say."],
        ),
        # links: text kept; files, categories, interlanguage gone; sister projects keep their label
        (
            "See [[Foo]] and [[Bar|the bar]] and [[wikt:baz|baz]] and [[:fr:Qux|qux]] now.",
            ["See Foo and the bar and baz and qux now."],
        ),
        ("A [[File:X.png|thumb|caption words here]] b c d e [[Image:Y.jpg]] f.", ["A b c d e f."]),
        ("Words here [[Category:Things]] and [[es:Cosa]] are gone.", ["Words here and are gone."]),
        # html entities and comments
        ("Fish &amp; chips &mdash; served <!-- not this --> hot every day.", ["Fish & chips — served hot every day."]),
        # headings dropped; reference-type sections dropped up to the next heading of their level
        (
            "== Intro ==\nThe first paragraph is here.\n== See also ==\n* Something else entirely different and long.\n"
            "=== Sub ===\nStill part of see also here.\n== Later ==\nThis one survives the cut.",
            ["The first paragraph is here.", "This one survives the cut."],
        ),
        # tables and table leftovers
        (
            "{| class=x\n|-\n| cell one two three four five\n|}\nAfter the table comes prose.",
            ["After the table comes prose."],
        ),
        # lists: only items that read like sentences
        (
            "* [[Alpha]]\n* Beta gamma delta epsilon zeta\n* This item is a whole sentence.\n#: Indented quote that ends properly.",
            ["This item is a whole sentence.", "Indented quote that ends properly."],
        ),
        # bold and italic, even unbalanced
        (
            "'''Bold''' and ''italic'' and '''''both''' text'' with ''unclosed markup here.",
            ["Bold and italic and both text with unclosed markup here."],
        ),
        # too short to be prose
        ("Just four words here.\nThumb.", []),
        # empty parentheses left by removed pronunciation templates
        (
            "'''Albedo''' ({{IPAc-en|æ|l}}) is the reflectivity of a surface.",
            ["Albedo is the reflectivity of a surface."],
        ),
        (
            "'''X''' ({{IPA|x}}; from Greek) is a letter of the alphabet.",
            ["X (from Greek) is a letter of the alphabet."],
        ),
        # tags: math and galleries dropped, others keep their text
        (
            "The value <math>x^2</math> is E = mc<sup>2</sup> in <span>this</span> text.<gallery>A.jpg|cap</gallery>",
            ["The value is E = mc2 in this text."],
        ),
    ],
)
def test_clean_wikitext_rules(wikitext: str, expected: list[str]) -> None:
    assert clean_wikitext(wikitext) == expected


def test_truncated_bz2_is_a_data_prep_error(dump: Path, tmp_path: Path) -> None:
    packed = bz2.compress(dump.read_bytes())
    bad = tmp_path / "cut.xml.bz2"
    bad.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataPrepError, match=r"cut\.xml\.bz2: truncated bz2"):
        list(iter_documents(bad))


def test_corrupt_bz2_is_a_data_prep_error(tmp_path: Path) -> None:
    bad = tmp_path / "junk.xml.bz2"
    bad.write_bytes(b"this is not bzip2 data at all")
    with pytest.raises(DataPrepError, match=r"junk\.xml\.bz2: "):
        list(iter_documents(bad))


def test_truncated_xml_is_a_data_prep_error(dump: Path, tmp_path: Path) -> None:
    bad = tmp_path / "cut.xml"
    text = dump.read_text(encoding="utf-8")
    bad.write_text(text[: text.index("<page>", text.index("Gizmo") - 200) + 30], encoding="utf-8")
    with pytest.raises(DataPrepError, match=r"cut\.xml: corrupt or truncated XML"):
        list(iter_documents(bad))


@pytest.mark.slow
def test_real_wikipedia_excerpt(wiki_dump: Path) -> None:
    stats = ReadStats()
    docs = list(iter_documents(wiki_dump, "auto", stats))
    # 106 main-namespace pages that are not redirects, 8 of them disambiguation pages; of the
    # 98 articles only "List of anthropologists" has no prose (its list items are names).
    assert 95 <= len(docs) <= 107
    assert len(docs) + stats.empty_documents == 98
    assert stats.sentences > 15_000
    assert stats.skipped_pages >= 99  # the redirects alone
    text = "\n".join(s for doc in docs for s in doc)
    for leftover in ("{{", "}}", "[[", "]]", "<ref", "|}", "{|", "&amp;", "&nbsp;", "thumb|"):
        assert leftover not in text, leftover
    assert docs[0][0] == (
        "Anarchism is a political philosophy that advocates self-governed societies based on voluntary institutions."
    )
    assert all(s and "\n" not in s and s == s.strip() for doc in docs for s in doc)


def test_bytes_that_are_not_utf8_are_refused_with_their_offset(dump: Path, tmp_path: Path) -> None:
    data = dump.read_bytes()
    at = data.index(b"Widget is") if b"Widget is" in data else len(data) // 2
    for bad, what in ((b"\xff", "byte that is not UTF-8"), (b"\x00", "NUL byte")):
        path = tmp_path / "bad.xml"
        path.write_bytes(data[:at] + bad + data[at:])
        with pytest.raises(DataPrepError, match=rf"^{path}: {what} at byte offset {at}: not UTF-8 XML$"):
            list(iter_documents(path))
        packed = tmp_path / "bad.xml.bz2"
        packed.write_bytes(bz2.compress(path.read_bytes()))
        with pytest.raises(DataPrepError, match=rf"byte offset {at} of the decompressed data"):
            list(iter_documents(packed))
