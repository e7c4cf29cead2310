"""Where a model's weights live on disk, read one tensor at a time.

The safetensors files are the source of truth for every switch: each Linear is requantized from
them, memory-mapped, so a switch never needs a second copy of the model. A hub id resolves to its
folder in the local Hugging Face cache; nothing is downloaded.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from langchain_adaptquant.errors import ModelNotFoundError, UnsupportedArchitectureError, WeightsError

INDEX_FILE = "model.safetensors.index.json"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def resolve_model_folder(model_id_or_path: str | Path) -> Path:
    """A local folder as given, else a pulled catalog model by name (``smollm2-135m``), else the
    snapshot folder of a hub id in the local cache."""
    path = Path(model_id_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ModelNotFoundError(f"model path {str(model_id_or_path)!r} is a file; expected a model folder")
    text = str(model_id_or_path)
    from langchain_adaptquant.pretrained.catalog import CATALOG

    if text in CATALOG:
        from langchain_adaptquant.pretrained.store import model_path

        return model_path(text).resolve()  # a clear error says how to pull it
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, local_files_only=True))
        except Exception as error:  # noqa: BLE001 - any miss means "not cached"; say so plainly
            raise ModelNotFoundError(
                f"model {text!r} is not a local folder and not in the Hugging Face cache "
                f"(nothing is downloaded at run time): {type(error).__name__}"
            ) from None
    raise ModelNotFoundError(f"model path {text!r} does not exist (expected a folder with config.json and *.safetensors)")


class WeightSource:
    """Read-only view of a model folder's safetensors, one tensor at a time.

    Tensors come back memory-mapped: their pages are file-backed and only count as resident once
    touched. Use as a context manager so file handles close after a load or a switch.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._stack: Optional[ExitStack] = None
        self._handles: dict[Path, Any] = {}
        self._index = self._build_index()

    def _build_index(self) -> dict[str, Path]:
        index_path = self.folder / INDEX_FILE
        if index_path.exists():
            try:
                mapping = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError) as error:
                raise WeightsError(f"{index_path} is not a valid safetensors index: {error}") from None
            return {name: self.folder / file for name, file in mapping.items()}
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise WeightsError(
                f"model folder {str(self.folder)!r} has no *.safetensors weights "
                f"(found: {', '.join(sorted(p.name for p in self.folder.iterdir())[:8]) or 'nothing'})"
            )
        index: dict[str, Path] = {}
        for file in files:
            for name in self._open(file).keys():
                index[name] = file
        self._close_all()
        return index

    def _open(self, file: Path) -> Any:
        from safetensors import SafetensorError, safe_open

        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt")
                if self._stack is not None:
                    handle = self._stack.enter_context(handle)
            except (SafetensorError, OSError) as error:
                raise WeightsError(f"cannot read weights {str(file)!r}: {error}") from None
            self._handles[file] = handle
        return handle

    def _close_all(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "WeightSource":
        self._stack = ExitStack()
        return self

    def __exit__(self, *exc: object) -> None:
        self._handles.clear()
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def keys(self) -> Iterator[str]:
        return iter(self._index)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, memory-mapped; a missing name or an unreadable file is a WeightsError."""
        file = self._index.get(name)
        if file is None:
            raise WeightsError(f"tensor {name!r} is missing from the weights in {str(self.folder)!r}")
        from safetensors import SafetensorError

        try:
            return self._open(file).get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise WeightsError(f"cannot read tensor {name!r} from {str(file)!r}: {error}") from None

    def nbytes(self, name: str) -> int:
        """Size of one stored tensor, from the header (no data is read)."""
        handle = self._open(self._index[name])
        meta = handle.get_slice(name)
        count = 1
        for dim in meta.get_shape():
            count *= dim
        return count * _DTYPE_BYTES.get(meta.get_dtype(), 2)

    def verify(self) -> None:
        """Open every file once, so a truncated or deleted file fails before anything is swapped."""
        for file in sorted(set(self._index.values())):
            if not file.exists():
                raise WeightsError(f"weights file {str(file)!r} was removed since the model was loaded")
            self._open(file)

    def config(self) -> Any:
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(str(self.folder))
        except (OSError, ValueError, KeyError) as error:
            raise UnsupportedArchitectureError(
                f"cannot read a transformers config from {str(self.folder)!r}: {error}"
            ) from None
