"""The embedded reference model shipped with the package (see its MODEL_CARD.md)."""

from __future__ import annotations

from pathlib import Path

#: Folder name of the shipped reference model under ``langchain_adaptquant/assets``.
REFERENCE_MODEL_NAME = "reference-llama"


def reference_model_path() -> Path:
    """Folder of the embedded reference model; loads offline with ``from_pretrained``."""
    return Path(__file__).resolve().parent / REFERENCE_MODEL_NAME
