"""Tiny models built from a config (random, seeded weights) and saved as bf16 safetensors."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import build_tiny


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return build_tiny("qwen2", tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory) -> Path:
    from tiny_models import build_tiny_chat

    return build_tiny_chat(tmp_path_factory.mktemp("tiny-chat"))
