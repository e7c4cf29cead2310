"""ruff and mypy, configured in pyproject.toml, pass on the package (ruff on the benchmarks too).

They run as subprocesses from the repository root so they read its pyproject.toml, exactly as a
developer's ``ruff check langchain_adaptquant benchmarks`` / ``mypy langchain_adaptquant`` would. mypy keeps
its cache in ``.mypy_cache`` (git-ignored): the first run reads torch and transformers (about a
minute on two cores), later runs take seconds.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec(tool) is None:
        pytest.skip(f"{tool} is not installed (it is in the dev extra: pip install -e '.[dev]')")
    return subprocess.run([sys.executable, "-m", tool, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=540, check=False)


def test_ruff_is_clean_on_the_package_and_the_benchmarks() -> None:
    done = _run("ruff", "check", "--no-cache", "langchain_adaptquant", "benchmarks")
    assert done.returncode == 0, f"ruff found problems:\n{done.stdout}\n{done.stderr}"


@pytest.mark.slow
def test_mypy_is_clean_on_the_package() -> None:
    done = _run("mypy", "--cache-dir", str(ROOT / ".mypy_cache"), "langchain_adaptquant")
    assert done.returncode == 0, f"mypy found problems:\n{done.stdout}\n{done.stderr}"
    assert "Success: no issues found" in done.stdout
