"""argparse ``type=`` functions shared by the commands (``adaptquant``, ``adaptquant simplify``, benchmarks).

Each turns a bad value into ``argparse.ArgumentTypeError`` with the package's own message, so every
command refuses it the same way (exit status 2, the value and what is allowed named).
"""

from __future__ import annotations

import argparse

from langchain_adaptquant.errors import InvalidValueError
from langchain_adaptquant.levels import TaskPriority


def priority(value: str) -> str:
    """``--priority``: quality, balanced or speed, in any case."""
    try:
        return TaskPriority.parse(value).value
    except InvalidValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
