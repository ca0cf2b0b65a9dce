"""Sentence splitting for raw prose (paragraphs, whole files, JSON lines, cleaned Wikipedia text).

blingfire's rule-based splitter is fast and ships its model inside the wheel, so nothing is
downloaded at run time. Over-long "sentences" (tables flattened into prose, lists without
punctuation, junk) are cut at whitespace so that no output line exceeds `max_chars`: a
downstream example is at most a few hundred tokens, and one giant line would dominate it.
"""

from __future__ import annotations

import blingfire

# ~400-500 SentencePiece tokens of English: longer than any real sentence, shorter than a
# 512-token example, so a cut never hides a whole example's worth of text in one line.
MAX_SENTENCE_CHARS = 2000


def normalize_whitespace(text: str) -> str:
    """Collapse every run of whitespace (newlines, tabs, U+2028, NBSP...) into one space.

    str.split() without arguments splits on all Unicode whitespace, so no line-breaking
    character can survive into an output line.
    """
    return " ".join(text.split())


def split_off(text: str, max_chars: int) -> tuple[list[str], str]:
    """Cut complete pieces of at most `max_chars` off the front of `text`, each ending at the
    last space before the bound (hard cut if there is none); return them (stripped, non-empty)
    and the rest, unstripped and at most `max_chars` long, which may continue elsewhere."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    pieces: list[str] = []
    start, n = 0, len(text)
    while n - start > max_chars:
        end = start + max_chars
        cut = text.rfind(" ", start + 1, end + 1)
        if cut <= start:
            cut = end
        piece = text[start:cut].strip()
        if piece:
            pieces.append(piece)
        start = cut
    return pieces, text[start:]


def cut_long(text: str, max_chars: int = MAX_SENTENCE_CHARS) -> list[str]:
    """`text` in stripped, non-empty pieces of at most `max_chars`, cut at spaces if possible."""
    pieces, rest = split_off(text, max_chars)
    rest = rest.strip()
    if rest:
        pieces.append(rest)
    return pieces


def split_sentences_counted(text: str, max_chars: int = MAX_SENTENCE_CHARS) -> tuple[list[str], int]:
    """Split one paragraph of prose into sentences; also return how many were cut for length.

    Line breaks inside `text` are treated as spaces (hard-wrapped text is common); callers
    that want a paragraph boundary to be a sentence boundary call this once per paragraph.
    """
    flat = normalize_whitespace(text)
    if not flat:
        return [], 0
    sentences: list[str] = []
    cut = 0
    for sentence in blingfire.text_to_sentences(flat).split("\n"):
        sentence = sentence.strip()
        if not sentence:
            continue
        if len(sentence) > max_chars:
            cut += 1
            sentences.extend(cut_long(sentence, max_chars))
        else:
            sentences.append(sentence)
    return sentences, cut


def split_sentences(text: str, max_chars: int = MAX_SENTENCE_CHARS) -> list[str]:
    """Sentences of `text`: stripped, non-empty, none longer than `max_chars`."""
    return split_sentences_counted(text, max_chars)[0]
