"""The ``simplify`` subcommand: rewrite a file (or standard input) for a grade and show the numbers.

Registered on any argparse subparsers object, so ``adaptquant`` (or a test) decides where it lives.
The pipeline and the model are imported when the command runs, not when the parser is built, so
``adaptquant --help`` stays fast. Bad input prints one line on stderr and returns 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Callable, Optional

from langchain_adaptquant.cli.argtypes import priority
from langchain_adaptquant.errors import AdaptQuantError

__all__ = ["add_simplify_command", "run_simplify"]

#: Builds the chat model from the parsed arguments; tests pass their own.
LLMFactory = Callable[[argparse.Namespace], Any]


def _grade(value: str) -> int:
    from langchain_adaptquant.pipelines.validation import MAX_GRADE, MIN_GRADE

    stripped = value.strip()
    if not stripped.isdigit() or not MIN_GRADE <= int(stripped) <= MAX_GRADE:
        raise argparse.ArgumentTypeError(
            f"invalid --grade {value!r}: a whole grade from {MIN_GRADE} to {MAX_GRADE} (13-16 = college)"
        )
    return int(stripped)


def _tolerance(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or not 0 <= number <= 10:
        raise argparse.ArgumentTypeError(f"invalid --tolerance {value!r}: a number of grades from 0 to 10")
    return number


def _attempts(value: str) -> int:
    if not value.strip().isdigit() or not 1 <= int(value) <= 10:
        raise argparse.ArgumentTypeError(f"invalid --attempts {value!r}: a whole number from 1 to 10")
    return int(value)


def _default_llm(args: argparse.Namespace) -> Any:
    from langchain_adaptquant.chat_model import ChatAdaptQuant

    return ChatAdaptQuant(model=args.model) if args.model else ChatAdaptQuant()


def _read_input(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def run_simplify(args: argparse.Namespace, llm_factory: Optional[LLMFactory] = None) -> int:
    """Handler of the subcommand: 0 on success, 2 on bad input (message on stderr)."""
    from langchain_adaptquant.pipelines.simplify import simplify_text, validate_request

    try:
        text = _read_input(args.file)
    except (OSError, UnicodeDecodeError) as error:
        print(f"adaptquant simplify: error: cannot read {args.file!r}: {error}", file=sys.stderr)
        return 2
    options: dict[str, Any] = {"tolerance": args.tolerance, "max_attempts": args.attempts}
    if args.priority:
        options["task_priority"] = args.priority
    if args.chunk_chars is not None:
        options["chunk_chars"] = args.chunk_chars
    try:
        validate_request(text, args.grade, args.subject, **options)  # before a model is loaded
        llm = (llm_factory or _default_llm)(args)
        result = simplify_text(text, args.grade, args.subject, llm=llm, **options)
    except (AdaptQuantError, ValueError) as error:
        print(f"adaptquant simplify: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        print(result.simplified_text)
    before, after = result.grade_before, result.grade_after
    summary = (
        f"grade {before.flesch_kincaid_grade:.1f} -> {after.flesch_kincaid_grade:.1f} (Flesch-Kincaid), "
        f"{before.consensus_grade:.1f} -> {after.consensus_grade:.1f} (consensus); target {result.target_grade} "
        f"{'met' if result.target_met else 'NOT met'}; facts kept {len(result.facts.kept)}/{len(result.facts.found)}; "
        f"{len(result.attempts)} attempt(s)"
        + (f"; level {result.quantization_level}" if result.quantization_level else "")
    )
    print(summary, file=sys.stderr)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def add_simplify_command(subparsers: Any, llm_factory: Optional[LLMFactory] = None) -> argparse.ArgumentParser:
    """Register ``simplify`` on ``subparsers`` (from ``parser.add_subparsers()``); returns its parser.

    The handler is stored as ``func`` (``args.func(args)`` returns the exit code). ``llm_factory`` builds
    the chat model from the parsed arguments; by default ``ChatAdaptQuant(model=--model)``.
    """
    parser = subparsers.add_parser(
        "simplify",
        help="rewrite a text for a school grade and measure the result",
        description="Rewrite a text for a target reading grade, keep its facts, and report the measured grades.",
    )
    parser.add_argument("file", help="text file to simplify, or - for standard input")
    parser.add_argument("--grade", type=_grade, default=8, help="target US grade, 1-16 (13-16 = college); default 8")
    parser.add_argument("--subject", default="Science", help="subject, e.g. Science, History, Math (any text)")
    parser.add_argument("--tolerance", type=_tolerance, default=1.0, help="grades above target still on target")
    parser.add_argument("--attempts", type=_attempts, default=3, help="attempts per chunk, 1-10; default 3")
    parser.add_argument(
        "--priority", type=priority, default=None, help="quality, balanced or speed (default: by text length)"
    )
    parser.add_argument("--chunk-chars", type=int, default=None, help="characters per chunk for long texts")
    parser.add_argument("--model", default=None, help="local model folder or Hugging Face cache name")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.set_defaults(func=lambda args: run_simplify(args, llm_factory))
    return parser
