import json
import shutil
import subprocess
import sys

import pytest

from langchain_adaptquant.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_calculate_json_has_the_documented_shape(capsys):
    code, out, _ = run(capsys, "calculate", "--params", "7", "--priority", "Balanced", "--json")
    assert code == 0
    data = json.loads(out)
    assert {"level", "precision", "compression_ratio", "estimated_memory_gb", "config", "reason"} <= set(data)
    assert data["level"] in {"fp16", "int8", "int4", "int2"}
    assert data["compression_ratio"].endswith("x")


def test_status_json(capsys):
    code, out, _ = run(capsys, "status", "--json")
    data = json.loads(out)
    assert code == 0 and data["device"] == "cpu"
    assert set(data["memory"]) >= {"total_gb", "available_gb", "used_percent", "process_gb"}


def test_status_table_mentions_memory_and_level(capsys):
    code, out, _ = run(capsys, "status", "--memory-budget-gb", "64")
    assert code == 0 and "recommended for 7.0B" in out and "available levels" in out


def test_demo_prints_the_replayed_timeline(capsys):
    code, out, _ = run(capsys, "demo", "--replay")
    assert code == 0
    for clock in ("10:00", "10:15", "10:30", "10:45", "11:00"):
        assert clock in out
    assert "downgraded" in out and "upgraded" in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["calculate", "--params", "0"], "invalid --params '0'"),
        (["calculate", "--params", "nan"], "invalid --params 'nan'"),
        (["calculate", "--params", "seven"], "invalid --params 'seven'"),
        (["calculate", "--params", "7", "--priority", "fast"], "invalid task priority: 'fast'"),
        (["calculate", "--params", "7", "--memory-budget-gb", "-2"], "invalid --memory-budget-gb '-2'"),
        (["calculate"], "--params"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_a_message(capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_insufficient_memory_is_a_clean_error(capsys):
    code, _, err = run(capsys, "calculate", "--params", "5000")
    assert code == 2 and "does not fit even at int2" in err


def test_console_script_is_installed():
    exe = shutil.which("adaptquant") or str(__import__("pathlib").Path(sys.executable).with_name("adaptquant"))
    result = subprocess.run([exe, "calculate", "--params", "0.5", "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["level"] in {"fp16", "int8", "int4", "int2"}
