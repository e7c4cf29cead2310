"""Checks on what callers pass to the simplification pipeline: all of them run before any model call.

Grades are whole US school grades 1-16 (13-16 are the four college years). A decimal target such as 6.5
is refused rather than rounded: readability formulas give decimals, but a target is a class a teacher
teaches, and silently rounding would hide a caller's mistake. Integral floats (6.0) and digit strings
("6", e.g. from JSON or a form) are accepted as that whole grade.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from langchain_adaptquant.control.levels import TaskPriority
from langchain_adaptquant.errors import InvalidValueError

__all__ = [
    "MAX_GRADE",
    "MAX_SUBJECT_CHARS",
    "MIN_GRADE",
    "validate_grade",
    "validate_int",
    "validate_priority",
    "validate_subject",
    "validate_text",
    "validate_tolerance",
]

MIN_GRADE = 1
MAX_GRADE = 16
MAX_SUBJECT_CHARS = 100
_GRADE_ALLOWED = f"a whole grade from {MIN_GRADE} to {MAX_GRADE} (13-16 = college)"


def _short(value: Any) -> Any:
    """Keep error messages one line: a huge or odd value is shown by its type and size."""
    text = repr(value)
    if len(text) <= 80:
        return value
    size = f", {len(value)} items" if hasattr(value, "__len__") else ""
    return f"<{type(value).__name__}{size}>"


def validate_grade(value: Any) -> int:
    """Return the grade as an int, or raise InvalidValueError naming the value and the range."""
    grade: Optional[int] = None
    if isinstance(value, bool):
        grade = None
    elif isinstance(value, int):
        grade = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        grade = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        grade = int(value.strip())
    if grade is None or not MIN_GRADE <= grade <= MAX_GRADE:
        raise InvalidValueError("grade_level", _short(value), _GRADE_ALLOWED)
    return grade


def validate_text(value: Any, max_chars: int) -> str:
    """A non-empty string with a letter or digit, at most ``max_chars`` characters long."""
    if not isinstance(value, str):
        raise InvalidValueError("text", _short(value), f"a string of 1 to {max_chars:,} characters")
    if len(value) > max_chars:
        # Never echo the text itself: it is long by definition.
        raise InvalidValueError(
            "text length", len(value), f"at most {max_chars:,} characters (max_chars={max_chars})"
        )
    if not any(ch.isalnum() for ch in value):
        raise InvalidValueError(
            "text", _short(value), f"a string with at least one letter or digit, at most {max_chars:,} characters"
        )
    return value


def validate_subject(value: Any) -> str:
    """Any subject name (the prompt has hints for common ones); non-empty, one line, short."""
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_SUBJECT_CHARS or "\n" in value:
        raise InvalidValueError("subject", _short(value), f"a one-line name of 1 to {MAX_SUBJECT_CHARS} characters")
    return " ".join(value.split())


def validate_priority(value: Any) -> Optional[TaskPriority]:
    """None (choose by text length) or a TaskPriority / its name."""
    return None if value is None else TaskPriority.parse(value)


def validate_int(name: str, value: Any, low: int, high: Optional[int] = None) -> int:
    """An int (not a bool) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"a whole number from {low:,} to {high:,}" if high is not None else f"a whole number >= {low:,}"
        raise InvalidValueError(name, _short(value), allowed)
    return value


def validate_tolerance(value: Any) -> float:
    """Grades above target the result may measure and still count as on target: a finite number 0-10."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not 0 <= value <= 10:
        raise InvalidValueError("tolerance", _short(value), "a number of grades from 0 to 10")
    return float(value)
