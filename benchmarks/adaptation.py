"""Replay memory/load traces against the real loader and model, and compare with static and reload-based choices.

    python -m benchmarks.adaptation [--model reference] [--steps 60] [--seed 2] [--quick]

Two traces run, each on a fresh loader: the documented 10:00-11:00 timeline (``EXAMPLE_TIMELINE``, 15
minutes a step) and a seeded random walk (``--steps`` steps, ``--step-s`` apart) of memory used and
requests in flight. The default seed (2) was picked, by replaying the decisions alone, because its
walk takes the reference model through all four levels (int2 at its 76% peak); other seeds stay
between 16-bit and int4. A trace's memory figure is what the *rest* of the machine uses; the scripted
probe reports it plus the model's measured stored bytes, so a switch changes what the next decision
sees, as it would on a real host.

The scripted machine is small on purpose: its size (the memory budget) is the model's 16-bit size
estimate divided by ``--fp16-share`` (default 0.15), so at 16-bit the model alone is 15% of memory.
Then whenever the rest of the machine uses 45% or more, 16-bit projects into the tight band (>= 60%),
where the policy must downgrade; the walk's troughs let it come back, and its highest peak (76%)
reaches the band where only int2 is allowed. With a budget in GiB the reference model (~17 MB) would
be invisible to the policy. ``min_headroom_gb`` is 0 (the 0.25 GiB default exceeds such a budget);
the 5% headroom share stays.

Time is a fake clock (``step`` x step seconds), and the policy's cooldowns are set in steps (upgrade
after 2 calm steps, a load-only downgrade after 1 step), so hysteresis acts within the replay. At each
step: ``loader.load_model`` with the step's requests held in the load tracker (the decision and any
in-place switch, its peak RSS sampled), then one ``ChatAdaptQuant.invoke`` when requests > 0 (it
counts as one of them) to show the model serves at the chosen level.

Per step: memory used (rest of the machine, and with the model), requests, level, action, switch
seconds, process RSS. Compared with: static 16-bit (steps where its projected memory would exceed the
budget, leave no headroom, or reach the pressure band), static INT4 (held-out perplexity of int4 vs
16-bit, measured on ``heldout_sample.txt``) and reload-based switching (peak = model before + model
after, from measured sizes, vs the in-place peak: model before + the memory the switch added at its
peak, as RSS and as anonymous memory; on a ~10M model fixed costs dominate that figure, see
``benchmarks/switch.py`` for larger models).

Writes a table, ``adaptation.json`` and ``adaptation.png`` (memory and level over steps, switches marked).
"""

from __future__ import annotations

import argparse
import random
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm.auto import tqdm

from benchmarks.common import (
    MB,
    RESULTS,
    eval_window,
    heldout_ids,
    machine_info,
    measured,
    model_folder,
    print_table,
    quiet_loader,
    read_status,
    write_json,
)
from langchain_adaptquant import ChatAdaptQuant, PolicyConfig
from langchain_adaptquant.backends.registry import available_levels
from langchain_adaptquant.control.replay import EXAMPLE_TIMELINE
from langchain_adaptquant.control.resources import GIB
from langchain_adaptquant.runtime.quality import score_text

DEFAULT_OUT_DIR = RESULTS
PROMPT = "What does json.dumps do?"
EXAMPLE_STEP_S = 900.0  # the documented timeline is fifteen minutes a step
COLUMNS = (
    ("trace", "trace"), ("clock", "clock"), ("background_percent", "rest %"), ("used_percent", "used %"),
    ("requests", "req"), ("level", "level"), ("action", "action"), ("switch_s", "switch s"),
    ("used_after_percent", "used after %"), ("rss_mb", "RSS MB"),
)

Trace = list[tuple[str, float, int]]  # (clock label, memory used by the rest of the machine %, requests)


@dataclass
class FakeClock:
    """The manager's clock: replay time advances by whole steps, so cooldowns are counted in steps."""

    now: float = 0.0

    def __call__(self) -> float:
        return self.now


# -- traces -------------------------------------------------------------------------------------------
def example_trace() -> Trace:
    return [(clock, float(used), int(requests)) for clock, used, requests in EXAMPLE_TIMELINE]


def random_walk(steps: int, seed: int, step_s: float) -> Trace:
    """Mean-reverting walks, seeded: memory used around 32% (5-88%), requests in flight around 2 (0-12)."""
    rng = random.Random(seed)
    used, requests, trace = 32.0, 1, []
    for step in range(steps):
        used = min(max(used + 0.15 * (32.0 - used) + rng.gauss(0.0, 10.0), 5.0), 88.0)
        requests = max(0, min(12, round(requests + 0.3 * (2 - requests) + rng.gauss(0.0, 1.5))))
        minutes = int(step * step_s // 60)
        trace.append((f"{minutes // 60:02d}:{minutes % 60:02d}", round(used, 1), requests))
    return trace


# -- per-level facts ----------------------------------------------------------------------------------
def measure_levels(folder: Path, levels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Stored bytes, sizing estimate and held-out perplexity per level, from one model switched in place."""
    loader, _ = quiet_loader()
    loaded = loader.load_model(folder, force_quantization="fp16")
    ids = heldout_ids(folder, loaded.tokenizer)
    facts, reference = {}, None
    for level in tqdm(levels, desc="measure levels", unit="level"):
        loader.requantize(loaded, level, reason="measure sizes")
        fact: dict[str, Any] = {
            "stored_bytes": loaded.stored_bytes,
            "estimated_bytes": loaded.size.estimated_bytes(level),
            "backends": loaded.backend_summary(),
            "perplexity": None,
            "top1_agreement": None,
        }
        if ids is not None:
            score = score_text(loaded.model, ids, eval_window(folder))
            reference = reference or score  # levels run 16-bit first
            fact["perplexity"] = round(score.perplexity, 4)
            fact["top1_agreement"] = round(score.agreement(reference), 4)
        facts[level] = fact
    loader.clear()
    return facts


def budget_bytes(folder: Path, fp16_share: float) -> int:
    """The scripted machine's size: the model's 16-bit estimate is ``fp16_share`` of it."""
    from transformers import AutoConfig

    from langchain_adaptquant.control.sizing import size_from_config

    size = size_from_config(AutoConfig.from_pretrained(str(folder)))
    return int(size.estimated_bytes("fp16") / fp16_share)


# -- the replay ---------------------------------------------------------------------------------------
def replay_policy(step_s: float) -> PolicyConfig:
    """Cooldowns in steps (upgrade after 2 calm steps, load-only downgrade after 1); no absolute headroom."""
    return PolicyConfig(min_headroom_gb=0.0, upgrade_cooldown_s=2 * step_s, load_downgrade_delay_s=step_s)


class Replayer:
    """One trace against one fresh loader: decide and switch with the real loader, then serve a request."""

    def __init__(self, folder: Path, budget: int, step_s: float, max_tokens: int, priority: str) -> None:
        self.folder, self.budget, self.step_s, self.priority = folder, budget, step_s, priority
        self.clock = FakeClock()
        self.policy = replay_policy(step_s)
        self.loader, self.probe = quiet_loader(total_gb=budget / GIB, policy=self.policy, clock=self.clock)
        self.llm = ChatAdaptQuant(model=str(folder), loader=self.loader, max_tokens=max_tokens, temperature=0,
                                  task_priority=priority)
        self.can_chat: Optional[bool] = None

    def _used(self, background: float) -> float:
        loaded = self.loader.get(str(self.folder))
        model = loaded.stored_bytes if loaded is not None else 0
        return min(100.0, background + 100.0 * model / self.budget)

    def step(self, index: int, clock: str, background: float, requests: int) -> dict[str, Any]:
        self.clock.now = index * self.step_s
        first = self.loader.get(str(self.folder)) is None
        used = self._used(background)
        self.probe.set(used)
        records: list[Any] = []
        reasons: list[str] = []
        with ExitStack() as in_flight:
            for _ in range(requests):
                in_flight.enter_context(self.loader.manager.tracker.track())
            loaded, peak = measured(lambda: self.loader.load_model(
                self.folder, task_priority=self.priority, on_switch=records.append, on_decision=reasons.append))
        record = records[-1] if records else None
        used_after = self._used(background)
        self.probe.set(used_after)  # the model's new size is part of what the machine uses now
        served = self._serve(loaded, requests)
        status = read_status()
        row: dict[str, Any] = {
            "step": index,
            "clock": clock,
            "background_percent": background,
            "used_percent": round(used, 2),
            "requests": requests,
            "level": loaded.level.value,
            "action": "initial load" if first else _action(record),
            "switch_s": round(peak["seconds"] if first else (record.seconds if record else 0.0), 3),
            "reason": reasons[-1] if reasons else "",
            "used_after_percent": round(used_after, 2),
            "stored_mb": round(loaded.stored_bytes / MB, 2),
            "rss_mb": round(status["VmRSS"] / MB, 1),
            "anon_mb": round(status["RssAnon"] / MB, 1),
            "served_level": served.get("level"),
            "served_switches": served.get("switches", 0),
        }
        if record is not None and record.ok:
            row["switch_memory"] = _switch_memory(record, peak)
        return row

    def _serve(self, loaded: Any, requests: int) -> dict[str, Any]:
        """One real chat request at the chosen level (it is one of the step's requests)."""
        if self.can_chat is None:
            self.can_chat = loaded.tokenizer is not None
        if requests < 1 or not self.can_chat:
            return {}
        with ExitStack() as in_flight:
            for _ in range(requests - 1):
                in_flight.enter_context(self.loader.manager.tracker.track())
            message = self.llm.invoke(PROMPT)
        meta = message.response_metadata
        return {"level": meta["quantization_level"], "switches": len(meta.get("switches", []))}

    def close(self) -> None:
        self.loader.clear()


def _action(record: Any) -> str:
    if record is None:
        return "kept"
    if not record.ok:
        return "switch failed"
    return "downgraded" if record.direction == "downgrade" else "upgraded"


def _switch_memory(record: Any, peak: dict[str, float]) -> dict[str, float]:
    """In-place peak (model before + what the switch added at its peak) vs reload peak (before + after).

    "Added" is measured twice: as RSS (includes the weights file's pages the switch read) and as
    anonymous memory (what the kernel cannot drop). Both include fixed costs (allocator, kernel
    workspaces) that dominate on very small models.
    """
    before, after = record.stored_bytes_before / MB, record.stored_bytes_after / MB
    added_rss = max(0.0, peak["peak_rss_mb"] - peak["rss_before_mb"])
    added_anon = max(0.0, peak["peak_anon_mb"] - peak["anon_before_mb"])
    return {
        "stored_before_mb": round(before, 2),
        "stored_after_mb": round(after, 2),
        "reload_peak_mb": round(before + after, 2),
        "in_place_peak_mb": round(before + added_rss, 2),
        "in_place_peak_anon_mb": round(before + added_anon, 2),
        "rss_before_mb": round(peak["rss_before_mb"], 1),
        "peak_rss_mb": round(peak["peak_rss_mb"], 1),
        "anon_before_mb": round(peak["anon_before_mb"], 1),
        "peak_anon_mb": round(peak["peak_anon_mb"], 1),
    }


def replay_trace(name: str, trace: Trace, step_s: float, folder: Path, budget: int,
                 args: argparse.Namespace) -> list[dict[str, Any]]:
    replayer = Replayer(folder, budget, step_s, args.max_tokens, args.priority)
    rows = []
    try:
        for index, (clock, background, requests) in enumerate(tqdm(trace, desc=f"replay {name}", unit="step")):
            rows.append({"trace": name, **replayer.step(index, clock, background, requests)})
    finally:
        replayer.close()
    return rows


# -- comparisons --------------------------------------------------------------------------------------
def compare(rows: list[dict[str, Any]], facts: dict[str, dict[str, Any]], budget: int,
            policy: PolicyConfig) -> dict[str, Any]:
    """Adaptive vs static 16-bit, static INT4 and reload-based switching over one trace."""
    limit_headroom = 100.0 - policy.headroom_percent
    share = {level: 100.0 * fact["stored_bytes"] / budget for level, fact in facts.items()}

    def over(percents: list[float]) -> dict[str, int]:
        return {
            "over_budget_steps": sum(p > 100.0 for p in percents),
            "no_headroom_steps": sum(p > limit_headroom for p in percents),
            "pressure_steps": sum(p >= policy.pressure_percent for p in percents),
        }

    adaptive = [row["used_after_percent"] for row in rows]
    levels = [row["level"] for row in rows]
    switches = [row["switch_memory"] for row in rows if "switch_memory" in row]
    result: dict[str, Any] = {
        "steps": len(rows),
        "adaptive": {
            **over(adaptive),
            "steps_per_level": {level: levels.count(level) for level in facts if levels.count(level)},
            "downgrades": sum(row["action"] == "downgraded" for row in rows),
            "upgrades": sum(row["action"] == "upgraded" for row in rows),
            "failed_switches": sum(row["action"] == "switch failed" for row in rows),
            "switch_seconds_total": round(sum(r["switch_s"] for r in rows if r["action"] in ("downgraded", "upgraded")), 3),
            "max_rss_mb": max(row["rss_mb"] for row in rows),
            "mean_perplexity": _mean([facts[level]["perplexity"] for level in levels]),
        },
        "static_fp16": over([row["background_percent"] + share["fp16"] for row in rows]) if "fp16" in share else None,
    }
    if "int4" in facts:
        result["static_int4"] = _static_int4(facts, levels)
    if switches:
        result["reload_vs_in_place"] = {
            "switches": len(switches),
            "max_reload_peak_mb": max(s["reload_peak_mb"] for s in switches),
            "max_in_place_peak_mb": max(s["in_place_peak_mb"] for s in switches),
            "max_in_place_peak_anon_mb": max(s["in_place_peak_anon_mb"] for s in switches),
            "mean_in_place_over_reload": _mean_ratio(switches, "in_place_peak_mb"),
            "mean_in_place_anon_over_reload": _mean_ratio(switches, "in_place_peak_anon_mb"),
        }
    return result


def _static_int4(facts: dict[str, dict[str, Any]], levels: list[str]) -> dict[str, Any]:
    fp16, int4 = facts.get("fp16", {}).get("perplexity"), facts["int4"]["perplexity"]
    return {
        "perplexity_int4": int4,
        "perplexity_fp16": fp16,
        "perplexity_increase_percent": round(100.0 * (int4 - fp16) / fp16, 3) if int4 and fp16 else None,
        "top1_agreement_int4": facts["int4"]["top1_agreement"],
        "adaptive_steps_above_int4": sum(level in ("fp16", "int8") for level in levels),
        "stored_mb_int4": round(facts["int4"]["stored_bytes"] / MB, 2),
    }


def _mean_ratio(switches: list[dict[str, float]], key: str) -> float:
    return round(sum(s[key] / s["reload_peak_mb"] for s in switches) / len(switches), 3)


def _mean(values: list[Optional[float]]) -> Optional[float]:
    known = [v for v in values if v is not None]
    return round(sum(known) / len(known), 4) if known and len(known) == len(values) else None


# -- output -------------------------------------------------------------------------------------------
LEVEL_ORDER = ("int2", "int4", "int8", "fp16")


def plot(traces: dict[str, list[dict[str, Any]]], facts: dict[str, dict[str, Any]], budget: int,
         policy: PolicyConfig, path: Path) -> Path:
    """Per trace: memory used (rest, with the model, static 16-bit) over steps, and the level with switches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(traces), figsize=(7 * len(traces), 6.5), sharex="col", squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]})
    fp16_share = 100.0 * facts["fp16"]["stored_bytes"] / budget if "fp16" in facts else None
    for column, (name, rows) in enumerate(traces.items()):
        memory, level_axis = axes[0][column], axes[1][column]
        steps = [row["step"] for row in rows]
        memory.plot(steps, [r["background_percent"] for r in rows], ":", color="grey", label="rest of the machine")
        memory.step(steps, [r["used_after_percent"] for r in rows], where="mid", label="with the adaptive model")
        if fp16_share is not None:
            memory.plot(steps, [r["background_percent"] + fp16_share for r in rows], "--", lw=1, label="static 16-bit")
        for edge in policy.memory_bands:
            memory.axhline(edge, color="k", lw=0.5, alpha=0.3)
        requests = memory.twinx()
        requests.bar(steps, [r["requests"] for r in rows], alpha=0.15, color="tab:purple")
        requests.set_ylabel("requests in flight")
        memory.set(ylabel="memory used % (bands at thresholds)", title=f"{name}", ylim=(0, 100))
        memory.legend(fontsize=8, loc="upper left")
        level_axis.step(steps, [LEVEL_ORDER.index(r["level"]) for r in rows], where="mid")
        for action, marker, color in (("downgraded", "v", "tab:red"), ("upgraded", "^", "tab:green")):
            marked = [r for r in rows if r["action"] == action]
            level_axis.scatter([r["step"] for r in marked], [LEVEL_ORDER.index(r["level"]) for r in marked],
                               marker=marker, color=color, s=60, zorder=3, label=action)
        level_axis.set_yticks(range(len(LEVEL_ORDER)), LEVEL_ORDER)
        level_axis.set(xlabel="step", ylabel="level", ylim=(-0.5, len(LEVEL_ORDER) - 0.5))
        level_axis.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adaptation", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference", help="'reference', a model-zoo name, or a model folder")
    parser.add_argument("--steps", type=int, default=60, help="steps of the random walk")
    parser.add_argument("--seed", type=int, default=2,
                        help="seed of the random walk (2: with the reference model it visits all four levels)")
    parser.add_argument("--step-s", type=float, default=300.0, help="seconds between random-walk steps (fake clock)")
    parser.add_argument("--fp16-share", type=float, default=0.15,
                        help="share of the scripted machine the model's 16-bit estimate takes; sets the budget")
    parser.add_argument("--budget-gb", type=float, default=None, help="scripted machine size in GiB (overrides --fp16-share)")
    parser.add_argument("--priority", default="balanced", choices=("quality", "balanced", "speed"))
    parser.add_argument("--max-tokens", type=int, default=8, help="new tokens per served request")
    parser.add_argument("--quick", action="store_true", help="8 walk steps, 2 tokens: a smoke test")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.max_tokens = 8, 2
    if args.steps < 1 or not 0 < args.fp16_share < 1 or args.max_tokens < 1:
        parser.error("--steps and --max-tokens must be >= 1 and --fp16-share in (0, 1)")
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(0)
    folder = model_folder(args.model)
    levels = sorted((level.value for level in available_levels("cpu")), key=lambda level: level != "fp16")
    budget = int(args.budget_gb * GIB) if args.budget_gb else budget_bytes(folder, args.fp16_share)
    print(f"scripted machine (memory budget): {budget / MB:.1f} MB", flush=True)
    facts = measure_levels(folder, levels)
    traces = {
        "example 10:00-11:00": (example_trace(), EXAMPLE_STEP_S),
        f"random walk (seed {args.seed})": (random_walk(args.steps, args.seed, args.step_s), args.step_s),
    }
    replays, comparisons, policies = {}, {}, {}
    for name, (trace, step_s) in traces.items():
        replays[name] = replay_trace(name, trace, step_s, folder, budget, args)
        policies[name] = replay_policy(step_s)
        comparisons[name] = compare(replays[name], facts, budget, policies[name])
    print()
    print_table([row for rows in replays.values() for row in rows], COLUMNS)
    _print_comparisons(comparisons)
    result = {
        "machine": machine_info(),
        "settings": {key: value for key, value in vars(args).items() if key != "out_dir"},
        "model": {"name": args.model, "folder": str(folder)},
        "budget_mb": round(budget / MB, 2),
        "levels": {level: {**fact, "stored_mb": round(fact["stored_bytes"] / MB, 2),
                           "share_of_budget_percent": round(100.0 * fact["stored_bytes"] / budget, 2)}
                   for level, fact in facts.items()},
        "policy": {name: policy.model_dump(mode="json") for name, policy in policies.items()},
        "traces": {name: {"step_s": step_s, "steps": replays[name], "comparison": comparisons[name]}
                   for name, (_, step_s) in traces.items()},
    }
    out_json = write_json(args.out_dir / "adaptation.json", result)
    out_png = plot(replays, facts, budget, next(iter(policies.values())), args.out_dir / "adaptation.png")
    print(f"wrote {out_json} and {out_png}")
    return result


def _print_comparisons(comparisons: dict[str, dict[str, Any]]) -> None:
    for name, comparison in comparisons.items():
        adaptive, fp16 = comparison["adaptive"], comparison["static_fp16"]
        print(f"\n{name}: {comparison['steps']} steps; adaptive levels {adaptive['steps_per_level']}, "
              f"{adaptive['downgrades']} down / {adaptive['upgrades']} up; pressure steps adaptive "
              f"{adaptive['pressure_steps']} vs static 16-bit {fp16['pressure_steps'] if fp16 else '-'}, "
              f"over budget {adaptive['over_budget_steps']} vs {fp16['over_budget_steps'] if fp16 else '-'}")
        if comparison.get("static_int4"):
            int4 = comparison["static_int4"]
            print(f"  static int4: perplexity {int4['perplexity_int4']} vs 16-bit {int4['perplexity_fp16']} "
                  f"({int4['perplexity_increase_percent']}%); adaptive ran above int4 in "
                  f"{int4['adaptive_steps_above_int4']} steps, mean perplexity {adaptive['mean_perplexity']}")
        if comparison.get("reload_vs_in_place"):
            reload = comparison["reload_vs_in_place"]
            print(f"  switches: in-place peak max {reload['max_in_place_peak_mb']} MB (RSS) / "
                  f"{reload['max_in_place_peak_anon_mb']} MB (anon) vs reload {reload['max_reload_peak_mb']} MB "
                  f"(mean ratios {reload['mean_in_place_over_reload']} / {reload['mean_in_place_anon_over_reload']})")


if __name__ == "__main__":
    main()
