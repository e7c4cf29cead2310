"""argparse ``type=`` functions shared by the commands (``adaptquant``, ``adaptquant simplify``, benchmarks).

Each turns a bad value into ``argparse.ArgumentTypeError`` with the package's own message, so every
command refuses it the same way (exit status 2, the value and what is allowed named).
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

from langchain_adaptquant.control.levels import TaskPriority
from langchain_adaptquant.errors import InvalidValueError


def priority(value: str) -> str:
    """``--priority``: quality, balanced or speed, in any case."""
    try:
        return TaskPriority.parse(value).value
    except InvalidValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def whole_number(flag: str, minimum: int = 1) -> Callable[[str], int]:
    """``--flag``: a whole number >= ``minimum``."""

    def parse(value: str) -> int:
        if not value.strip().isdigit() or int(value) < minimum:
            raise argparse.ArgumentTypeError(f"invalid --{flag} {value!r}: a whole number >= {minimum}")
        return int(value)

    return parse


def positive_number(flag: str, zero: bool = False, expected: str = "a number") -> Callable[[str], float]:
    """``--flag``: a finite number > 0 (>= 0 with ``zero``); ``expected`` says what a number means here."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid --{flag} {value!r}: expected {expected}") from None
        if not math.isfinite(number) or number < 0 or (number == 0 and not zero):
            bound = ">= 0" if zero else "greater than 0"
            raise argparse.ArgumentTypeError(f"invalid --{flag} {value!r}: must be a finite number {bound}")
        return number

    return parse
