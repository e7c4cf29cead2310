"""Cut long texts into pieces a model's context window holds, at paragraph, then sentence, boundaries.

A chunk travels in the prompt, comes back rewritten, and on a retry travels again with the previous
answer beside it: about three times its size plus the instructions must fit the context window. Sizes
are in characters (about 4 per token for English), so no tokenizer is needed to plan the cut.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Sequence

from langchain_adaptquant.pipelines.readability import split_sentences

__all__ = [
    "CHARS_PER_TOKEN",
    "Chunk",
    "PARAGRAPH_SEPARATOR",
    "chunk_chars_for_context",
    "join_chunks",
    "split_into_chunks",
]

CHARS_PER_TOKEN = 4
#: Tokens kept for the system message, the instructions and the feedback of a retry.
PROMPT_RESERVE_TOKENS = 600
PARAGRAPH_SEPARATOR = "\n\n"
MIN_CHUNK_CHARS = 200


def chunk_chars_for_context(context_tokens: int) -> int:
    """Largest chunk (characters) such that chunk + previous answer + new answer + prompt fit the context."""
    return max(MIN_CHUNK_CHARS, (context_tokens - PROMPT_RESERVE_TOKENS) // 3 * CHARS_PER_TOKEN)


class Chunk(NamedTuple):
    """A piece of the text and what joins it to the piece before: a blank line, or a space inside a paragraph."""

    text: str
    separator: str


def split_into_chunks(text: str, max_chars: int) -> list[Chunk]:
    """Pack whole paragraphs (separated by blank lines) into chunks of at most ``max_chars``.

    A paragraph longer than ``max_chars`` is cut between sentences; a single sentence longer than that is
    cut between words (and a single word longer than that, which only happens in junk, between characters).
    """
    pieces: list[Chunk] = []
    for paragraph in re.split(r"\n[ \t]*\n", text.strip()):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        parts = [paragraph] if len(paragraph) <= max_chars else _split_paragraph(paragraph, max_chars)
        pieces.extend(Chunk(part, PARAGRAPH_SEPARATOR if i == 0 else " ") for i, part in enumerate(parts))
    chunks: list[Chunk] = []
    for piece in pieces:
        if chunks and len(chunks[-1].text) + len(piece.separator) + len(piece.text) <= max_chars:
            chunks[-1] = Chunk(chunks[-1].text + piece.separator + piece.text, chunks[-1].separator)
        else:
            chunks.append(piece)
    if chunks:
        chunks[0] = Chunk(chunks[0].text, "")
    return chunks


def _split_paragraph(paragraph: str, max_chars: int) -> list[str]:
    """Cut one paragraph into parts of at most ``max_chars``; the parts of a paragraph are joined by spaces."""
    units: list[str] = []
    for sentence in split_sentences(paragraph):
        units.extend([sentence] if len(sentence) <= max_chars else _split_words(sentence, max_chars))
    parts: list[str] = []
    for unit in units:
        if parts and len(parts[-1]) + 1 + len(unit) <= max_chars:
            parts[-1] += " " + unit
        else:
            parts.append(unit)
    return parts


def _split_words(sentence: str, max_chars: int) -> list[str]:
    parts: list[str] = []
    for word in sentence.split():
        while len(word) > max_chars:
            parts.append(word[:max_chars])
            word = word[max_chars:]
        if parts and len(parts[-1]) + 1 + len(word) <= max_chars:
            parts[-1] += " " + word
        else:
            parts.append(word)
    return parts


def join_chunks(texts: Sequence[str], chunks: Sequence[Chunk]) -> str:
    """Reassemble rewritten ``texts`` in the order and with the separators of the original ``chunks``."""
    return "".join(chunk.separator + text.strip() for text, chunk in zip(texts, chunks))
