"""The package's public names resolve lazily (PEP 562), and the loader does not drag in the chat model."""

import subprocess
import sys

import langchain_adaptquant


def test_every_public_name_has_a_submodule_and_resolves():
    assert sorted(langchain_adaptquant._EXPORTS) == sorted(langchain_adaptquant.__all__)
    for name in langchain_adaptquant.__all__:
        assert getattr(langchain_adaptquant, name) is not None
    assert set(langchain_adaptquant.__all__) <= set(dir(langchain_adaptquant))


def test_unknown_names_raise_attribute_error_and_submodules_still_import():
    try:
        langchain_adaptquant.no_such_name  # noqa: B018
    except AttributeError as error:
        assert "no_such_name" in str(error)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")
    from langchain_adaptquant import model_zoo

    assert model_zoo.__name__ == "langchain_adaptquant.model_zoo"


def test_importing_the_loader_leaves_chat_model_and_langchain_out():
    code = (
        "import sys, langchain_adaptquant\n"
        "assert 'torch' not in sys.modules, 'package import pulled in torch'\n"
        "import langchain_adaptquant.runtime.loader\n"
        "bad = [m for m in ('langchain_core', 'langchain_adaptquant.chat_model') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_control_imports_neither_runtime_nor_backends():
    """Control decides from numbers: a manager answers without the weights layers being imported."""
    code = (
        "import sys\n"
        "from langchain_adaptquant.control.manager import DynamicQuantizationManager\n"
        "from langchain_adaptquant.control.replay import EXAMPLE_TIMELINE, replay\n"
        "from langchain_adaptquant.control.resources import ScriptedProbe\n"
        "m = DynamicQuantizationManager(probe=ScriptedProbe(total_gb=64, used_percent=10))\n"
        "assert m.calculate_optimal_quantization(1.0).level.value == 'fp16'\n"
        "assert len(replay(EXAMPLE_TIMELINE)) == 5\n"
        "bad = [m for m in sys.modules if m.startswith(('langchain_adaptquant.runtime', 'langchain_adaptquant.backends'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_chat_model_and_the_llama_cpp_runtime_import_no_torch():
    """The llama.cpp path's own modules stay torch-free (the engine contract lives in torch-free modules);
    torch comes only with the torch runtime, a grammar, or the Hugging Face tokenizer."""
    code = (
        "import sys\n"
        "from langchain_adaptquant.chat_model import ChatAdaptQuant\n"
        "import langchain_adaptquant.runtime.registry, langchain_adaptquant.runtime.requests\n"
        "import langchain_adaptquant.runtime.text, langchain_adaptquant.runtime.contract\n"
        "import langchain_adaptquant.runtime.llamacpp.gguf_files, langchain_adaptquant.runtime.llamacpp.weights\n"
        "import langchain_adaptquant.runtime.llamacpp.engine, langchain_adaptquant.runtime.llamacpp.loader\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "ChatAdaptQuant(max_tokens=4)\n"
        "assert 'torch' not in sys.modules, 'building the chat model imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
