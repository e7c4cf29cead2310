"""The ``adaptquant`` command: calculate, status, demo, serve, chat and simplify.

argparse keeps the CLI free of extra dependencies; tables use rich when it is installed (the
server extra) and plain text otherwise. Bad input exits with status 2 and a one-line message.
The work lives elsewhere (``demo``, ``server.run``); this module only parses and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Mapping, Optional, Sequence, cast

from langchain_adaptquant.cli.argtypes import positive_number, priority, whole_number
from langchain_adaptquant.errors import AdaptQuantError, InvalidValueError

_params = positive_number("params", expected="a number of billions, e.g. 7")
_budget = positive_number("memory-budget-gb", expected="a number of GiB")


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
    from langchain_adaptquant.runtime.loader import serving_manager

    return serving_manager(memory_budget_gb=getattr(args, "memory_budget_gb", None))


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
            ("memory", f"{memory['used_percent']}% of {memory['total_gb']} GiB ({memory['limit_source']} limit)"),
            ("available", f"{memory['available_gb']} GiB"),
            ("process", f"{memory['process_gb']} GiB RSS, {memory['process_anon_gb']} GiB anonymous"),
            ("available levels", ", ".join(status["available_levels"])),
            (f"recommended for {status['recommended_for_params_b']}B", status["recommended_level"]),
            ("reason", status["recommendation_reason"]),
        ],
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.replay:
        return cmd_replay(args)
    return cmd_live_demo(args)


def _model_path(value: Optional[str]) -> str:
    """The model a command serves: as given (a folder or a catalog name), else the real chat model when
    pulled (`adaptquant models pull smollm2-135m`), else the embedded reference model."""
    from langchain_adaptquant.pretrained import default_chat_model

    return value or str(default_chat_model())


def cmd_live_demo(args: argparse.Namespace) -> int:
    """The documented example timeline against a real model: real generation, real switches, a live table."""
    from langchain_adaptquant.cli.demo import progress_line, render, run_demo, switch_lines, transcript_lines

    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:  # plain lines when rich is missing
        Console = Live = None  # type: ignore[assignment,misc]
    model = _model_path(args.model)
    total_gb = args.total_gb or 16.0
    title = f"Live: example timeline on {os.path.basename(model.rstrip('/'))}, {args.priority} priority, " \
            f"scripted memory of a {total_gb:g} GiB host, 15 virtual minutes per step"
    console = Console() if Console is not None else None
    if console is not None and not console.is_terminal:
        console = Console(width=100)  # a log file has no width: the table is made to fit 100 columns
    rows: list[Any] = []
    if console is not None and console.is_terminal and Live is not None:
        with Live(render(rows, title), console=console, refresh_per_second=8) as live:

            def show(row: Any) -> None:
                rows.append(row)
                live.update(render(rows, title))

            result = run_demo(model, args.priority, total_gb=total_gb, max_tokens=args.max_tokens, on_row=show,
                              runtime=args.runtime)
    else:
        print(title, flush=True)

        def line(row: Any) -> None:  # not a terminal (CI, a pipe): one line per step as it ends
            rows.append(row)
            print("  " + progress_line(row), flush=True)

        result = run_demo(model, args.priority, total_gb=total_gb, max_tokens=args.max_tokens, on_row=line,
                          runtime=args.runtime)
        if console is not None:
            console.print(render(rows, title))
    print(f"served by the {result.runtime} runtime", flush=True)
    print("why each step chose its level, and its first answer (whole):", flush=True)
    for text in transcript_lines(rows):
        print(f"  {text}")
    print("switches (measured):", flush=True)
    for text in switch_lines(result.switches) or ["none"]:
        print(f"  {text}")
    telemetry = result.telemetry
    print(f"telemetry: {telemetry['calls']} calls, {telemetry['errors']} errors, switches {telemetry['switches']}, "
          f"levels {telemetry['levels']}, latency p50 {telemetry['latency_p50_s']}s p95 {telemetry['latency_p95_s']}s, "
          f"tokens {telemetry['tokens']}")
    print(f"done in {result.seconds:.1f}s (memory is scripted; generation, load and switches are real)")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from langchain_adaptquant.control.replay import EXAMPLE_HOST_GB, replay

    args.total_gb = args.total_gb or EXAMPLE_HOST_GB
    rows = replay(model_size_params=args.params, task_priority=args.priority, total_gb=args.total_gb)
    _print_table(
        f"Example timeline replayed through the decision engine: {args.params:g}B model, "
        f"{args.priority} priority, {args.total_gb:g} GiB host",
        ["time", "memory", "requests", "level", "model size", "action", "reason"],
        [
            (r.clock, f"{r.used_percent:.0f}%", r.requests, r.level.value.upper(), f"{r.size_gb:.2f} GiB", r.action, r.reason)
            for r in rows
        ],
    )
    if args.total_gb == EXAMPLE_HOST_GB:
        print(f"(sizes are honest estimates: see `adaptquant calculate --params {args.params:g}`)")
    return 0


def _port(value: str) -> int:
    if not value.strip().isdigit() or not 0 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid --port {value!r}: a whole number from 0 to 65535 (0 picks a free one)")
    return int(value)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from langchain_adaptquant.server.run import serve
    except ImportError as error:
        raise InvalidValueError("command", "serve", f"an install with the server extra: pip install "
                                f"'langchain-adaptquant[server]' ({error})") from None
    from langchain_adaptquant.serve_ray import cli as ray_cli

    token = args.token or os.environ.get("ADAPTQUANT_TOKEN") or None
    if args.ray:
        return ray_cli.run(args, _model_path(args.model), token)
    budget = ray_cli.check_plain_serve(args)
    return serve(_model_path(args.model), host=args.host, port=args.port, token=token, max_queue=args.max_queue,
                 max_tokens_limit=args.max_tokens_limit, memory_budget_gb=budget,
                 preload=not args.no_preload, log_level=args.log_level)


def cmd_chat(args: argparse.Namespace) -> int:
    """A streaming REPL: one line in, the answer token by token, then the level it was served at."""
    from langchain_core.messages import AIMessage, HumanMessage

    from langchain_adaptquant.chat_model import ChatAdaptQuant
    from langchain_adaptquant.runtime.loader import AdaptiveModelLoader, serving_manager
    from langchain_adaptquant.runtime.weights import resolve_model_folder

    model = _model_path(args.model)
    resolve_model_folder(model)  # a missing model is an error before the prompt appears
    loader = AdaptiveModelLoader(manager=serving_manager(memory_budget_gb=args.memory_budget_gb),
                                 show_progress=False)
    llm = ChatAdaptQuant(model=model, loader=loader, task_priority=args.priority, max_tokens=args.max_tokens,
                         temperature=args.temperature)
    interactive = sys.stdin.isatty()
    print(f"chatting with {os.path.basename(model.rstrip('/'))} ({args.priority} priority); "
          "/quit to exit, /reset to forget the conversation", flush=True)
    history: list[Any] = []
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not line:
            break  # end of input
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            history.clear()
            print("(conversation forgotten)", flush=True)
            continue
        history.append(HumanMessage(text))
        answer: list[str] = []
        last, started = None, time.perf_counter()
        try:
            for chunk in llm.stream(history[-args.history:]):
                if chunk.content:
                    piece = cast(str, chunk.content)  # ChatAdaptQuant streams text content
                    answer.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                last = chunk
        except KeyboardInterrupt:
            print("\n[interrupted]", flush=True)
            history.pop()
            continue
        history.append(AIMessage("".join(answer)))
        meta = last.response_metadata if last is not None else {}
        usage: Mapping[str, Any] = (last.usage_metadata if last is not None else None) or {}
        switched = "".join(f", switched {s['from_level']} -> {s['to_level']}" for s in meta.get("switches", []))
        print(f"\n[{meta.get('quantization_level', '?')} · {usage.get('output_tokens', 0)} tokens · "
              f"{time.perf_counter() - started:.2f}s{switched}]", flush=True)
    return 0


_MODEL_HELP = ("model folder or pulled catalog name, e.g. smollm2-135m (default: smollm2-135m when pulled, "
               "else the embedded reference model)")


def build_parser() -> argparse.ArgumentParser:
    from langchain_adaptquant.serve_ray import cli as ray_cli

    parser = argparse.ArgumentParser(prog="adaptquant", description="Adaptive quantization for local LLMs.")
    parser.add_argument("--verbose", action="store_true",
                        help="log at DEBUG, including the quantization libraries' start-up notices")
    sub = parser.add_subparsers(dest="command", required=True)

    calc = sub.add_parser("calculate", help="the level a model of this size would get now")
    calc.add_argument("--params", type=_params, required=True, help="parameters in billions, e.g. 7")
    calc.add_argument("--priority", type=priority, default="balanced", help="quality, balanced or speed")
    calc.add_argument("--memory-budget-gb", type=_budget, default=None, help="cap the memory the policy may use")
    calc.add_argument("--json", action="store_true", help="print JSON (the REST API's shape)")
    calc.set_defaults(func=cmd_calculate)

    status = sub.add_parser("status", help="memory, load and the recommended level on this machine")
    status.add_argument("--params", type=_params, default=7.0, help="model size for the recommendation")
    status.add_argument("--memory-budget-gb", type=_budget, default=None)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    demo = sub.add_parser("demo", help="the documented re-optimization timeline, live on a real model (--replay: engine only)")
    demo.add_argument("--model", default=None, help=_MODEL_HELP)
    demo.add_argument("--priority", type=priority, default="balanced")
    demo.add_argument("--max-tokens", type=whole_number("max-tokens"), default=24, help="tokens per demo answer")
    demo.add_argument("--runtime", choices=("auto", "torch", "llamacpp"), default="auto",
                      help="who runs the weights (auto: llama.cpp on a CPU for a model with a GGUF, else torch)")
    demo.add_argument("--replay", action="store_true", help="replay the timeline through the decision engine only")
    demo.add_argument("--params", type=_params, default=7.0, help="--replay: model size in billions")
    demo.add_argument("--total-gb", type=_budget, default=None,
                      help="host memory the timeline's percentages refer to (default 16; --replay: 512)")
    demo.set_defaults(func=cmd_demo)

    serve = sub.add_parser("serve", help="REST API, OpenAI-compatible chat and dashboard for one model")
    serve.add_argument("--model", default=None, help=_MODEL_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind; non-loopback needs --token")
    serve.add_argument("--port", type=_port, default=8000)
    serve.add_argument("--token", default=None, help="bearer token for chat and cache/clear (or ADAPTQUANT_TOKEN)")
    serve.add_argument("--max-queue", type=whole_number("max-queue"), default=16, help="chat requests in flight before 503")
    serve.add_argument("--max-tokens-limit", type=whole_number("max-tokens-limit"), default=1024)
    serve.add_argument("--memory-budget-gb", type=ray_cli.budget_list, default=None,
                       help="GiB the policy may count on; with --ray one per replica rank, e.g. 4,1.5")
    serve.add_argument("--no-preload", action="store_true", help="load the model on the first request instead")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    ray_cli.add_ray_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    chat = sub.add_parser("chat", help="interactive chat on stdin/stdout, streaming, with the level per answer")
    chat.add_argument("--model", default=None, help=_MODEL_HELP)
    chat.add_argument("--priority", type=priority, default="balanced")
    chat.add_argument("--max-tokens", type=whole_number("max-tokens"), default=128)
    chat.add_argument("--temperature", type=float, default=None)
    chat.add_argument("--history", type=whole_number("history"), default=8, help="messages of context to keep")
    chat.add_argument("--memory-budget-gb", type=_budget, default=None)
    chat.set_defaults(func=cmd_chat)

    from langchain_adaptquant.pipelines.simplify_cli import add_simplify_command
    from langchain_adaptquant.pretrained.cli import add_models_command

    add_simplify_command(sub)
    add_models_command(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("langchain_adaptquant").setLevel(logging.DEBUG)
    try:
        return int(args.func(args))
    except (AdaptQuantError, ValueError) as error:
        print(f"adaptquant: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
