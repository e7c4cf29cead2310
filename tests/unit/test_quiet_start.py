"""The CLI starts without the quantization libraries' import-time notices, and our own warnings still show.

Each case runs a fresh interpreter: the notices are printed once per process, at first import.
"""

import os
import subprocess
import sys

import pytest

from langchain_adaptquant.quiet_start import KNOWN_NOTICES

#: The lines the issue quotes, as they appear on a CPU build of torch 2.13 with torchao 0.18.
NOISE = ("_C_mxfp8", "_C_cutlass_90a", "is an Enum subclass", "gemm_4bit_forward from kernels-community")


def _run(*code_or_argv: str, module: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ADAPTQUANT_VERBOSE"}
    env["HF_HUB_OFFLINE"] = "1"
    argv = [sys.executable, "-c", *code_or_argv] if not module else [sys.executable, "-m", *code_or_argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)


def _noise_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(part in line for part in NOISE)]


@pytest.mark.parametrize("argv", [("--help",), ("calculate", "--params", "7")])
def test_cli_start_has_none_of_the_library_notices(argv):
    result = _run("langchain_adaptquant.cli.main", *argv, module=True)
    assert result.returncode == 0, result.stderr
    assert _noise_in(result.stdout + result.stderr) == []


def test_verbose_lets_the_notices_through():
    """The filter is what removes them (not their absence on this machine): --verbose shows them again."""
    quiet = _run("langchain_adaptquant.cli.main", "calculate", "--params", "7", module=True)
    loud = _run("langchain_adaptquant.cli.main", "--verbose", "calculate", "--params", "7", module=True)
    assert quiet.returncode == loud.returncode == 0
    assert _noise_in(quiet.stderr) == []
    if not _noise_in(loud.stderr):
        pytest.skip("this environment's libraries print none of the known notices even when verbose")
    assert len(_noise_in(loud.stderr)) >= 1


def test_our_warnings_and_other_library_warnings_still_show():
    code = (
        "import logging\n"
        "import langchain_adaptquant.backends as b\n"
        "b.available_backends()\n"
        "logging.getLogger('langchain_adaptquant.backends.registry').warning('our own warning')\n"
        "logging.getLogger('torchao').warning('another torchao warning')\n"
        "logging.getLogger('torchao').warning('Failed to load /x/_C_mxfp8.so: gone')\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert "our own warning" in result.stderr
    assert "another torchao warning" in result.stderr
    assert "_C_mxfp8" not in result.stderr


def test_every_known_notice_names_its_logger_and_reason():
    for notice in KNOWN_NOTICES:
        assert notice.logger and notice.contains and notice.why_harmless
