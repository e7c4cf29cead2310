"""Prompts for grade-level rewriting: one system message per grade band, subject hints, retry feedback.

The passage travels between <passage> tags so the model can tell it from the instructions (and a test
double can find it). Retries show the model its previous answer and say what to fix, with numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder

from langchain_adaptquant.pipelines.readability import word_count

__all__ = [
    "GRADE_BANDS",
    "GradeBand",
    "SUBJECT_HINTS",
    "build_messages",
    "clean_answer",
    "feedback_text",
    "grade_band",
    "subject_hint",
]


@dataclass(frozen=True)
class GradeBand:
    """Writing targets for a range of grades; sentence lengths are typical of texts read at those grades."""

    name: str
    low: int
    high: int
    max_sentence_words: int
    guidance: str


GRADE_BANDS: tuple[GradeBand, ...] = (
    GradeBand(
        "grades 1-3", 1, 3, 8,
        "Use very short sentences with one idea each. Use everyday words a young child says out loud. "
        "Avoid words of three or more syllables unless they are the topic's key terms. Talk to the reader directly.",
    ),
    GradeBand(
        "grades 4-6", 4, 6, 12,
        "Use short sentences and common words. Explain one idea at a time, in order. Replace long words with "
        "short ones when the meaning stays the same. A simple example or comparison can help.",
    ),
    GradeBand(
        "grades 7-9", 7, 9, 16,
        "Use clear sentences of moderate length. Prefer common words, but keep precise terms the subject needs. "
        "Split sentences that hold more than one main idea.",
    ),
    GradeBand(
        "grades 10-12", 10, 12, 20,
        "Write clear, direct prose for a high-school reader. Keep the subject's vocabulary. Cut nested clauses, "
        "filler and passive constructions that hide who does what.",
    ),
    GradeBand(
        "college (grades 13-16)", 13, 16, 25,
        "Write concise academic prose for an undergraduate. Technical vocabulary is fine; make the structure "
        "of the argument easy to follow and remove needless complexity.",
    ),
)

#: Subject -> what to protect and how to explain it. Keys are matched case-insensitively.
SUBJECT_HINTS: dict[str, str] = {
    "science": "Keep scientific terms (name the process, the parts, the units) and define each one in plain words "
    "the first time it appears. Keep cause and effect in the right order.",
    "math": "Keep every number, symbol and mathematical term exactly. Define terms with a small concrete example. "
    "Never change a value, an operation or the order of steps.",
    "history": "Keep names of people, places, events and every date. Keep the order of events and who caused what. "
    "Explain old or unusual words briefly.",
    "literature": "Keep the names of authors, works and characters, and any quoted lines word for word. Explain "
    "literary terms (such as metaphor or narrator) simply; keep the interpretation, not just the plot.",
    "geography": "Keep every place name, direction, distance and number. Define landform and climate words simply.",
    "health": "Keep every dose, number and medical term; define each term simply. Keep warnings and advice exact; "
    "do not make advice stronger or weaker than the source.",
    "technology": "Keep product, standard and protocol names and all numbers. Explain technical terms with an "
    "everyday comparison.",
    "economics": "Keep every figure, percentage and date, and economic terms such as inflation or supply; define "
    "them simply with an everyday example.",
    "civics": "Keep the names of institutions, laws and officials, and every date. Explain how the parts "
    "relate without taking sides.",
    "art": "Keep the names of artists, works, movements and dates; describe techniques in plain words.",
    "music": "Keep the names of composers, works, instruments and musical terms; explain terms simply.",
}
_SUBJECT_ALIASES = {
    "biology": "science", "chemistry": "science", "physics": "science", "earth science": "science",
    "astronomy": "science", "mathematics": "math", "maths": "math", "algebra": "math", "geometry": "math",
    "social studies": "history", "english": "literature", "language arts": "literature",
    "ela": "literature", "computer science": "technology", "computing": "technology", "it": "technology",
    "medicine": "health", "nutrition": "health", "economy": "economics", "government": "civics",
}
_GENERIC_HINT = (
    "Keep the subject's key terms and define each one simply the first time it appears. Keep every name, "
    "number and date."
)

_SYSTEM = (
    "You rewrite {subject} texts so that students in {band} can read them (target: US grade {grade}).\n"
    "{band_guidance} Aim for sentences of at most about {max_words} words.\n"
    "{subject_hint}\n"
    "Rules: keep every fact, number (with its unit), date and name from the original; do not add new facts; "
    "do not leave out ideas. Answer with the rewritten text only: no title, no introduction, no notes."
)
_HUMAN = (
    "Rewrite this text for grade {grade} {subject}.\n\n<passage>\n{text}\n</passage>{note}"
)

PROMPT = ChatPromptTemplate.from_messages(
    [("system", _SYSTEM), ("human", _HUMAN), MessagesPlaceholder("history", optional=True)]
)


def grade_band(grade: int) -> GradeBand:
    """The band holding ``grade`` (1-16, validated by the caller)."""
    for band in GRADE_BANDS:
        if band.low <= grade <= band.high:
            return band
    raise ValueError(f"grade {grade} is outside 1-16")


def subject_hint(subject: str) -> str:
    """Subject-specific guidance, or the generic hint: any subject string is allowed."""
    key = " ".join(subject.lower().split())
    key = _SUBJECT_ALIASES.get(key, key)
    return SUBJECT_HINTS.get(key, _GENERIC_HINT)


def build_messages(
    text: str,
    grade: int,
    subject: str,
    previous_answer: Optional[str] = None,
    feedback: Optional[str] = None,
) -> list[BaseMessage]:
    """Messages for one attempt. A retry shows the previous answer (when it had one) and the feedback."""
    band = grade_band(grade)
    history: list[BaseMessage] = []
    note = ""
    if feedback and previous_answer:
        history = [AIMessage(content=previous_answer), HumanMessage(content=feedback)]
    elif feedback:
        note = f"\n\n{feedback}"
    return PROMPT.format_messages(
        subject=subject,
        band=band.name,
        grade=grade,
        band_guidance=band.guidance,
        max_words=band.max_sentence_words,
        subject_hint=subject_hint(subject),
        text=text,
        note=note,
        history=history,
    )


def feedback_text(
    grade: int,
    tolerance: float,
    measured: Optional[float],
    long_sentences: Sequence[str],
    missing_facts: Sequence[str],
) -> str:
    """Say what to fix, with numbers: the measured grade, the longest sentences, the missing facts."""
    if measured is None:
        return (
            "Your previous answer was empty. Write the full rewritten text now, and nothing else."
        )
    parts: list[str] = []
    if measured > grade + tolerance:
        parts.append(
            f"Your rewrite measures grade {measured:.1f} (Flesch-Kincaid), above the target of grade {grade} "
            f"(at most {grade + tolerance:g}). Use shorter sentences and shorter, more common words."
        )
        if long_sentences:
            band = grade_band(grade)
            listed = "\n".join(f'- "{s}" ({word_count(s)} words)' for s in long_sentences)
            parts.append(
                f"Your longest sentences are:\n{listed}\nSplit each into sentences of at most about "
                f"{band.max_sentence_words} words."
            )
    else:
        parts.append(f"Your rewrite measures grade {measured:.1f} (Flesch-Kincaid), which is on target.")
    if missing_facts:
        listed = ", ".join(f'"{f}"' for f in missing_facts)
        parts.append(f"These facts from the original are missing; include each of them exactly: {listed}.")
    parts.append("Answer with the whole corrected text only.")
    return "\n\n".join(parts)


_PREAMBLE_STARTS = ("here is", "here's", "sure", "certainly", "okay", "ok,", "rewritten", "simplified")


def clean_answer(answer: str) -> str:
    """Strip what models wrap around the text: code fences, <passage> tags, a 'Here is ...:' first line."""
    text = answer.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        if text.rstrip().endswith("```"):
            text = text.rstrip()[:-3]
    text = text.replace("<passage>", "").replace("</passage>", "").strip()
    first, _, rest = text.partition("\n")
    if rest.strip() and first.rstrip().endswith(":") and first.strip().lower().startswith(_PREAMBLE_STARTS):
        text = rest.strip()
    return text
