"""Readability numbers (textstat) and a plain sentence splitter shared by the pipeline.

textstat 0.7.x looks English syllables up in NLTK's CMU dictionary and, when that corpus is not
installed, tries to *download* it on first use. Tests and offline machines must never reach the
network, so before first use we check for the corpus on disk and, when it is missing, make textstat
count syllables with pyphen (the path textstat itself takes for languages without a CMU dictionary).
:func:`syllable_source` says which one produced the numbers, so benchmark results stay comparable.
"""

from __future__ import annotations

import functools
import re
from types import ModuleType
from typing import Optional

from pydantic import BaseModel, Field

__all__ = [
    "ReadabilityScore",
    "longest_sentences",
    "measure",
    "split_sentences",
    "syllable_source",
    "word_count",
]

_syllables = "textstat"


class ReadabilityScore(BaseModel):
    """Grade estimates of one text: Flesch-Kincaid drives the loop, the consensus is reported beside it."""

    flesch_kincaid_grade: float = Field(description="Flesch-Kincaid grade level (can be below 1 for very easy text)")
    consensus_grade: float = Field(
        description="textstat.text_standard(float_output=True): consensus of several formulas, 1-18"
    )
    sentences: int = Field(description="sentences counted by this module's splitter")
    words: int = Field(description="words counted by this module's tokenizer")


@functools.lru_cache(maxsize=1)
def _textstat() -> ModuleType:
    global _syllables
    try:
        import textstat
    except ImportError as error:  # an optional extra: say which one
        raise ImportError(
            "the simplification pipeline needs textstat: pip install 'langchain-adaptquant[simplify]'"
        ) from error
    _syllables = _keep_syllable_counting_offline()
    return textstat


def _keep_syllable_counting_offline() -> str:
    """Return 'cmudict' when NLTK's corpus is on disk, else route textstat to pyphen and return 'pyphen'."""
    try:
        import nltk

        nltk.data.find("corpora/cmudict")
        return "cmudict"
    except LookupError:
        pass
    except ImportError:  # older textstat releases use pyphen only and do not import nltk
        return "pyphen"
    try:
        from textstat.backend.counts import _count_syllables
    except ImportError:
        return "pyphen"
    # count_syllables treats a missing dictionary (None) as "not English" and falls back to pyphen.
    _count_syllables.get_cmudict = lambda lang: None
    return "pyphen"


def syllable_source() -> str:
    """'cmudict' or 'pyphen': which syllable counter textstat uses in this process."""
    _textstat()
    return _syllables


def measure(text: str) -> ReadabilityScore:
    """Measure a text's grade level two ways; rounded to 2 decimals so results compare stably."""
    ts = _textstat()
    return ReadabilityScore(
        flesch_kincaid_grade=round(float(ts.flesch_kincaid_grade(text)), 2),
        consensus_grade=round(float(ts.text_standard(text, float_output=True)), 2),
        sentences=len(split_sentences(text)),
        words=word_count(text),
    )


_WORD = re.compile(r"[A-Za-z0-9\u00C0-\u024F]+(?:['\u2019\-][A-Za-z0-9\u00C0-\u024F]+)*")

# Words ending in a period that do not end a sentence. Single capital letters (initials) are handled apart.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e cf fig no approx ca inc ltd co mt ft jan feb mar apr jun jul "
    "aug sep sept oct nov dec u.s u.k a.m p.m".split()
)

# A candidate boundary: terminal punctuation, optional closing quotes/brackets, then whitespace.
_BOUNDARY = re.compile(r"([.!?]+)([\"'\u201d\u2019)\]]*)(\s+)")


def word_count(text: str) -> int:
    """Count words the way the pipeline's feedback does (hyphenated words and contractions are one word)."""
    return len(_WORD.findall(text))


def split_sentences(text: str) -> list[str]:
    """Split at terminal punctuation followed by space; skip common abbreviations and initials.

    Deliberately simple (no NLP library): good enough to find long sentences for feedback, to cut an
    oversized paragraph and to tell where a sentence starts. A line break ends a sentence when the line
    is short (a heading), or the next line is a list item; otherwise it is a hard wrap inside a sentence.
    """
    sentences: list[str] = []
    for line in _logical_lines(text):
        start = 0
        for match in _BOUNDARY.finditer(line):
            before = line[start : match.start()].split()
            last = before[-1].lower() if before else ""
            after = line[match.end() : match.end() + 1]
            if match.group(1) == "." and (last in _ABBREVIATIONS or re.fullmatch(r"[a-z]", last)):
                continue  # "Dr. Lee", "J. K. Rowling", "e.g. this"
            if after and after.islower():
                continue  # "the U.S. economy", "approx. five"
            sentences.append(line[start : match.end()].strip())
            start = match.end()
        rest = line[start:].strip()
        if rest:
            sentences.append(rest)
    return sentences


_LIST_ITEM = re.compile(r"\s*(?:[-*\u2022]|\d+[.)])\s")


def _logical_lines(text: str) -> list[str]:
    """Undo hard wraps: a line break ends a sentence after terminal punctuation, before a list item, or
    after a short single line (a heading) followed by a capital; otherwise the lines are one sentence."""
    lines: list[str] = []
    current, joined = "", False
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            if current:
                lines.append(current)
            current, joined = "", False
            continue
        heading = not joined and len(current.split()) <= 8 and (line[0].isupper() or line[0].isdigit())
        if current and (_LIST_ITEM.match(raw) or current[-1] in ".!?:;" or heading):
            lines.append(current)
            current, joined = line, False
        elif current:
            current, joined = f"{current} {line}", True
        else:
            current = line
    if current:
        lines.append(current)
    return lines


def longest_sentences(text: str, count: int = 3, min_words: int = 0) -> list[str]:
    """The ``count`` longest sentences by word count, in text order, those with at least ``min_words``."""
    sentences = split_sentences(text)
    ranked = sorted(range(len(sentences)), key=lambda i: (-word_count(sentences[i]), i))
    keep = sorted(i for i in ranked[:count] if word_count(sentences[i]) >= min_words)
    return [sentences[i] for i in keep]


def grade_or_none(text: str) -> Optional[ReadabilityScore]:
    """Measure non-empty text; None for empty text (textstat would report a meaningless 0)."""
    return measure(text) if text.strip() else None
