"""The ``adaptquant`` command: calculate, status, demo and simplify.

argparse keeps the CLI free of extra dependencies; tables use rich when it is installed (the
server extra) and plain text otherwise. Bad input exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Optional, Sequence

from langchain_adaptquant.errors import AdaptQuantError, InvalidValueError
from langchain_adaptquant.levels import TaskPriority


def _params(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --params {value!r}: expected a number of billions, e.g. 7")
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"invalid --params {value!r}: must be a finite number greater than 0")
    return number


def _priority(value: str) -> str:
    try:
        return TaskPriority.parse(value).value
    except InvalidValueError as error:
        raise argparse.ArgumentTypeError(str(error))


def _budget(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --memory-budget-gb {value!r}: expected a number of GiB")
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"invalid --memory-budget-gb {value!r}: must be greater than 0")
    return number


def _print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(columns)]
        print(title)
        print("  ".join(str(c).ljust(w) for c, w in zip(columns, widths)))
        for row in rows:
            print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(v) for v in row))
    Console(width=160).print(table)


def _manager(args: argparse.Namespace) -> Any:
    from langchain_adaptquant.manager import DynamicQuantizationManager

    return DynamicQuantizationManager(memory_budget_gb=getattr(args, "memory_budget_gb", None))


def cmd_calculate(args: argparse.Namespace) -> int:
    result = _manager(args).calculate_optimal_quantization(args.params, args.priority)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        data = result.to_dict()
        _print_table(
            f"Optimal quantization for {args.params:g}B parameters, {args.priority} priority",
            ["field", "value"],
            [(key, json.dumps(value) if isinstance(value, dict) else value) for key, value in data.items()],
        )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = _manager(args).get_status(model_size_params=args.params)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    memory = status["memory"]
    _print_table(
        "adaptquant status",
        ["field", "value"],
        [
            ("device", status["device"]),
            ("active requests", status["active_requests"]),
            ("memory", f"{memory['used_percent']} of {memory['total_gb']} GiB ({memory['limit_source']} limit)"),
            ("available", f"{memory['available_gb']} GiB"),
            ("process", f"{memory['process_gb']} GiB RSS, {memory['process_anon_gb']} GiB anonymous"),
            ("available levels", ", ".join(status["available_levels"])),
            (f"recommended for {status['recommended_for_params_b']}B", status["recommended_level"]),
            ("reason", status["recommendation_reason"]),
        ],
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from langchain_adaptquant.replay import SEED_HOST_GB, replay

    rows = replay(model_size_params=args.params, task_priority=args.priority, total_gb=args.total_gb)
    _print_table(
        f"Seed timeline replayed through the decision engine: {args.params:g}B model, "
        f"{args.priority} priority, {args.total_gb:g} GiB host",
        ["time", "memory", "requests", "level", "model size", "action", "reason"],
        [
            (r.clock, f"{r.used_percent:.0f}%", r.requests, r.level.value.upper(), f"{r.size_gb:.2f} GiB", r.action, r.reason)
            for r in rows
        ],
    )
    if args.total_gb == SEED_HOST_GB:
        print(f"(sizes are honest estimates: see `adaptquant calculate --params {args.params:g}`)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptquant", description="Adaptive quantization for local LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    calc = sub.add_parser("calculate", help="the level a model of this size would get now")
    calc.add_argument("--params", type=_params, required=True, help="parameters in billions, e.g. 7")
    calc.add_argument("--priority", type=_priority, default="balanced", help="quality, balanced or speed")
    calc.add_argument("--memory-budget-gb", type=_budget, default=None, help="cap the memory the policy may use")
    calc.add_argument("--json", action="store_true", help="print JSON (the REST API's shape)")
    calc.set_defaults(func=cmd_calculate)

    status = sub.add_parser("status", help="memory, load and the recommended level on this machine")
    status.add_argument("--params", type=_params, default=7.0, help="model size for the recommendation")
    status.add_argument("--memory-budget-gb", type=_budget, default=None)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    demo = sub.add_parser("demo", help="replay the seed's re-optimization timeline through the engine")
    demo.add_argument("--params", type=_params, default=7.0)
    demo.add_argument("--priority", type=_priority, default="balanced")
    demo.add_argument("--total-gb", type=_budget, default=512.0, help="host memory the replay assumes")
    demo.set_defaults(func=cmd_demo)

    from langchain_adaptquant.pipelines.simplify_cli import add_simplify_command

    add_simplify_command(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (AdaptQuantError, ValueError) as error:
        print(f"adaptquant: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
