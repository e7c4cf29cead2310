"""Bad input across the Python API and the CLI: a clear, typed error, and no state changed.

Each case names the bad value in its message (or the field/limit), and afterwards the model cache,
the load counters and the loaded model's level are exactly as before. REST cases live with the
server tests (tests/integration/test_server.py).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
from langchain_core.messages import FunctionMessage
from pydantic import ValidationError

from langchain_adaptquant import (
    ChatAdaptQuant,
    DynamicQuantizationManager,
    InvalidValueError,
    PolicyConfig,
    QuantizationLevel,
    ScriptedProbe,
    TaskPriority,
)
from langchain_adaptquant.backends.base import UnsupportedLevelError
from langchain_adaptquant.cli.main import main as cli_main
from langchain_adaptquant.errors import ModelNotFoundError, UnsupportedArchitectureError, WeightsError
from langchain_adaptquant.runtime.loader import AdaptiveModelLoader


@pytest.fixture(scope="module")
def world(tiny_chat_dir, tmp_path_factory):
    manager = DynamicQuantizationManager(probe=ScriptedProbe(total_gb=16, used_percent=20), snapshot_ttl_s=0)
    loader = AdaptiveModelLoader(manager=manager, show_progress=False)
    llm = ChatAdaptQuant(model=str(tiny_chat_dir), loader=loader, max_tokens=2)
    llm.invoke("warm up")
    broken = tmp_path_factory.mktemp("broken")
    shutil.copy(tiny_chat_dir / "config.json", broken / "config.json")
    corrupt = tmp_path_factory.mktemp("corrupt")
    shutil.copy(tiny_chat_dir / "config.json", corrupt / "config.json")
    (corrupt / "model.safetensors").write_bytes(b"garbage")
    alien = tmp_path_factory.mktemp("alien")
    (alien / "config.json").write_text('{"model_type": "not-a-real-architecture"}')
    shutil.copy(tiny_chat_dir / "model.safetensors", alien / "model.safetensors")
    text_file = tmp_path_factory.mktemp("text") / "passage.txt"
    text_file.write_text("Photosynthesis turns light into chemical energy.")
    return {"llm": llm, "loader": loader, "manager": manager, "broken": broken, "corrupt": corrupt,
            "alien": alien, "text_file": text_file}


def state(world) -> Any:
    loader, manager = world["loader"], world["manager"]
    models = [(m["path"], m["level"], m["access_count"]) for m in loader.stats()]
    stats = manager.tracker.stats()
    return models, stats.total, stats.active


Case = tuple[str, Callable[[dict], Any], type, str]

PYTHON_CASES: list[Case] = [
    ("level name", lambda w: QuantizationLevel.parse("int3"), InvalidValueError, "'int3'"),
    ("priority name", lambda w: TaskPriority.parse("fast"), InvalidValueError, "'fast'"),
    ("zero parameters", lambda w: w["manager"].calculate_optimal_quantization(0), InvalidValueError, "model_size_params"),
    ("negative parameters", lambda w: w["manager"].calculate_optimal_quantization(-7), InvalidValueError, "-7"),
    ("NaN parameters", lambda w: w["manager"].calculate_optimal_quantization(math.nan), InvalidValueError, "nan"),
    ("parameters as text", lambda w: w["manager"].calculate_optimal_quantization("7"), InvalidValueError, "'7'"),
    ("thresholds out of order", lambda w: PolicyConfig(memory_bands=(60, 40, 75, 85)), ValidationError, "strictly increasing"),
    ("zero budget", lambda w: DynamicQuantizationManager(memory_budget_gb=0), InvalidValueError, "memory_budget_gb"),
    ("negative budget", lambda w: DynamicQuantizationManager(memory_budget_gb=-1.5), InvalidValueError, "-1.5"),
    ("unknown model path", lambda w: w["loader"].load_model("/no/such/model"), ModelNotFoundError, "/no/such/model"),
    ("folder without weights", lambda w: w["loader"].load_model(w["broken"]), WeightsError, "no \\*.safetensors"),
    ("corrupt safetensors", lambda w: w["loader"].load_model(w["corrupt"]), WeightsError, "cannot read weights"),
    ("unsupported architecture", lambda w: w["loader"].load_model(w["alien"]), UnsupportedArchitectureError, "not-a-real-architecture"),
    ("forced unknown level", lambda w: w["loader"].load_model(w["llm"].model, force_quantization="int5"), InvalidValueError, "'int5'"),
    ("chat max_tokens 0", lambda w: ChatAdaptQuant(max_tokens=0), ValidationError, "max_tokens"),
    ("chat negative temperature", lambda w: ChatAdaptQuant(temperature=-1), ValidationError, "temperature"),
    ("chat unknown priority", lambda w: ChatAdaptQuant(task_priority="urgent"), ValidationError, "'urgent'"),
    ("empty message list", lambda w: w["llm"].invoke([]), InvalidValueError, "at least one message"),
    ("per-call max_tokens", lambda w: w["llm"].invoke("x", max_tokens=-1), InvalidValueError, "-1"),
    ("per-call priority", lambda w: w["llm"].invoke("x", task_priority="urgent"), InvalidValueError, "'urgent'"),
    ("per-call model not a string", lambda w: w["llm"].invoke("x", model=123), InvalidValueError, "123"),
    ("unsupported message type", lambda w: w["llm"].invoke([FunctionMessage(content="x", name="f")]), InvalidValueError, "FunctionMessage"),
    ("unconvertible tool", lambda w: w["llm"].bind_tools([42]), InvalidValueError, "42"),
    ("empty text to simplify", lambda w: _simplify(w, "   "), InvalidValueError, "text"),
    ("grade out of range", lambda w: _simplify(w, "Plants grow.", grade_level=17), InvalidValueError, "17"),
    ("text not a string", lambda w: _simplify(w, 12345), InvalidValueError, "12345"),
    ("text over the size limit", lambda w: _simplify(w, "a " * 300_000), InvalidValueError, "500,000"),
]


def _simplify(world, text, **kwargs):
    from langchain_adaptquant.pipelines import simplify_text

    return simplify_text(text, llm=world["llm"], **kwargs)


@pytest.mark.parametrize("name, call, error, needle", PYTHON_CASES, ids=[c[0] for c in PYTHON_CASES])
def test_python_api_bad_input(world, name, call, error, needle):
    before = state(world)
    with pytest.raises(error, match=needle):
        call(world)
    assert state(world) == before


def test_forced_level_without_backend_changes_nothing(world, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "optimum.quanto", None)  # neither quanto nor int2pack's
    monkeypatch.setitem(sys.modules, "torchao.quantization.quant_primitives", None)  # quantizer: no int2 now
    before = state(world)
    with pytest.raises(UnsupportedLevelError, match="'int2'.*available there: 'fp16'"):
        world["llm"].invoke("x", force_quantization="int2")
    assert state(world) == before


CLI_CASES = [
    (["calculate", "--params", "0"], "invalid --params '0'"),
    (["calculate", "--params", "7", "--priority", "fast"], "invalid task priority: 'fast'"),
    (["status", "--memory-budget-gb", "-1"], "invalid --memory-budget-gb '-1'"),
    (["simplify", "--grade", "20", "FILE"], "20"),
    (["simplify", "/no/such/file.txt"], "/no/such/file.txt"),
]


@pytest.mark.parametrize("argv, needle", CLI_CASES, ids=[" ".join(c[0][:3]) for c in CLI_CASES])
def test_cli_bad_input(world, capsys, argv, needle):
    argv = [str(world["text_file"]) if a == "FILE" else a for a in argv]
    before = state(world)
    try:
        code = cli_main(argv)
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    assert needle in capsys.readouterr().err
    assert state(world) == before
