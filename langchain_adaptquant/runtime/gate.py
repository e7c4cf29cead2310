"""StepGate: generation steps and weight switches never overlap; a waiting switch goes first.

The engine runs each forward pass inside :meth:`StepGate.step`; the loader swaps layers inside
:meth:`StepGate.exclusive`. A switch therefore waits for the step in progress to end (one step at
most: new steps do not start while a switch waits), and every token is produced with one known
set of weights. A plain lock would not do: the engine re-acquires it right after each step and
could starve a waiting switch.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class StepGate:
    """A writer-preferring reader/writer gate: many steps at once, or one switch alone."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._steps = 0
        self._switching = False
        self._switches_waiting = 0

    @contextmanager
    def step(self) -> Iterator[None]:
        """Run one forward pass; waits while a switch runs or is waiting."""
        with self._cond:
            while self._switching or self._switches_waiting:
                self._cond.wait()
            self._steps += 1
        try:
            yield
        finally:
            with self._cond:
                self._steps -= 1
                if not self._steps:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Swap weights: waits for the step in progress to end, and no step starts until this ends."""
        with self._cond:
            self._switches_waiting += 1
            try:
                while self._switching or self._steps:
                    self._cond.wait()
            finally:
                self._switches_waiting -= 1
            self._switching = True
        try:
            yield
        finally:
            with self._cond:
                self._switching = False
                self._cond.notify_all()

    @property
    def switch_pending(self) -> bool:
        """A switch runs or waits: the engine should not start a step now."""
        return self._switching or bool(self._switches_waiting)
