"""The artifact store: one directory per generation, written atomically, with a checksummed manifest.

``<root>/<id>/`` holds a generation's files and ``generation.json``, its manifest: the caller's fields,
``"id"``, ``"files"`` (``{relative path: {"sha256", "bytes"}}`` for every other file, recursively) and
``"checksum"`` (a SHA-256 over that file table). A write fills ``<root>/.tmp-<id>-<random>/``, writes
the manifest last, fsyncs, and renames the directory into place, so a crash leaves either no ``<id>``
directory or a complete one; leftover temporaries are removed by ``clean_temporaries``. A directory
whose manifest is missing or does not verify does not exist for the rest of the system.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selftune.policies.errors import ArtifactError, ConflictError

MANIFEST = "generation.json"
TEMPORARY_PREFIX = ".tmp-"
HASH_CHUNK_BYTES = 1 << 20
RESERVED_FIELDS = ("id", "files", "checksum")
NOT_EXPORTED = frozenset({"fisher.safetensors", "report.html", "report.md"})
"""Top-level files that ``export`` leaves out: they are records of the cycle, not part of the model.
Subdirectories (``adapter/``, ``plots/``) are left out too; ``generation.json`` is always copied."""

FileTable = dict[str, dict[str, Any]]
Fill = Callable[[Path], "dict[str, Any] | None"]


class ArtifactStore:
    """Generation directories under ``root`` (``<state>/generations``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def write(self, generation_id: int, fill: Fill, manifest: dict[str, Any]) -> Path:
        """Create generation ``generation_id``: ``fill(tmp_dir)`` writes its files, the store the manifest.

        ``fill`` may return extra manifest fields. Refuses (``ConflictError``) an id that already has a
        directory. Returns the final directory.
        """
        _check_id(generation_id)
        _check_reserved(manifest, "the manifest given to write()")
        target = self._dir(generation_id)
        if target.exists():
            raise ConflictError(
                f"generation {generation_id} already exists at {target}: a generation is written once; "
                "use a new id, or delete that directory if it is known to be garbage"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        # mkdtemp makes it 0o700 and the rename keeps that: generations hold models of users' data.
        temporary = Path(tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}{generation_id}-", dir=self.root))
        try:
            extra = fill(temporary) or {}
            document = _manifest_document(generation_id, manifest, extra, temporary)
            _write_durably(temporary / MANIFEST, _dump(document))
            _fsync_tree(temporary)
            if target.exists():  # another writer won the race while fill ran
                raise ConflictError(f"generation {generation_id} appeared at {target} while it was being written")
            os.rename(temporary, target)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        _fsync_directory(self.root)
        return target

    def verify(self, generation_id: int, deep: bool = True) -> dict[str, Any]:
        """The manifest, after checking every file's presence and size and, if ``deep``, its SHA-256.

        Raises ``ArtifactError`` listing every problem found, each naming the file.
        """
        directory = self._dir(generation_id)
        document = self._read_manifest(generation_id, directory)
        expected: FileTable = document["files"]
        problems = []
        if _table_checksum(expected) != document.get("checksum"):
            problems.append(f"{MANIFEST}: the checksum does not match its file table (the manifest was edited)")
        present = set(_relative_files(directory)) - {MANIFEST}
        problems += [f"{name}: missing" for name in sorted(set(expected) - present)]
        problems += [f"{name}: not in the manifest (an extra file)" for name in sorted(present - set(expected))]
        for name in sorted(set(expected) & present):
            problems += _file_problems(directory / name, name, expected[name], deep)
        if problems:
            listed = "\n".join(f"  - {p}" for p in problems)
            raise ArtifactError(
                f"generation {generation_id} at {directory} fails verification:\n{listed}\n"
                "Its files were changed after it was written; restore them from a backup, or re-create the generation."
            )
        return document

    def path(self, generation_id: int) -> Path:
        """The generation's directory, once its manifest is present and every file has its recorded size."""
        self.verify(generation_id, deep=False)
        return self._dir(generation_id)

    def ids(self) -> list[int]:
        """Generations whose directory has a manifest that parses (temporaries and strays ignored)."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            generation_id = _parse_id(entry.name)
            if generation_id is not None and entry.is_dir() and _load_json(entry / MANIFEST) is not None:
                found.append(generation_id)
        return sorted(found)

    def clean_temporaries(self) -> list[Path]:
        """Remove the ``.tmp-*`` directories that crashed writes left behind; return what was removed.

        Call it when no write is in flight (at daemon start): it cannot tell a crashed write from a running one.
        """
        if not self.root.is_dir():
            return []
        removed = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(TEMPORARY_PREFIX) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
                removed.append(entry)
        return removed

    def export(self, generation_id: int, dest: Path) -> Path:
        """Copy the generation's transformers files and its ``generation.json`` into ``dest`` (new or empty).

        Checksums are verified first, so an export is never of a damaged generation.
        """
        dest = Path(dest)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise ConflictError(
                f"export destination {dest} exists and is not an empty directory: choose a new or empty directory"
            )
        document = self.verify(generation_id, deep=True)
        source = self._dir(generation_id)
        dest.mkdir(parents=True, exist_ok=True)
        for name in sorted(document["files"]):
            if "/" not in name and name not in NOT_EXPORTED:
                shutil.copyfile(source / name, dest / name)
        shutil.copyfile(source / MANIFEST, dest / MANIFEST)
        return dest

    def _dir(self, generation_id: int) -> Path:
        _check_id(generation_id)
        return self.root / str(generation_id)

    def _read_manifest(self, generation_id: int, directory: Path) -> dict[str, Any]:
        if not directory.is_dir():
            raise ArtifactError(f"generation {generation_id} has no directory at {directory}")
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            raise ArtifactError(
                f"generation {generation_id} at {directory}: {MANIFEST} is missing, so the directory is incomplete "
                "and does not count as a generation; delete it, or re-create the generation"
            )
        document = _load_json(manifest_path)
        if document is None or not isinstance(document.get("files"), dict):
            raise ArtifactError(
                f"generation {generation_id} at {directory}: {MANIFEST} is not a manifest (not JSON, or no "
                '"files" table); re-create the generation'
            )
        if document.get("id") != generation_id:
            raise ArtifactError(
                f"generation {generation_id} at {directory}: {MANIFEST} says id {document.get('id')!r}; "
                "the directory was renamed or copied over another one"
            )
        return document


def file_digest(path: Path) -> tuple[str, int]:
    """SHA-256 (hex) and size of a file, read in 1 MiB chunks so that big weights never sit in memory."""
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray(HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as handle:
        while read := handle.readinto(buffer):
            digest.update(view[:read])
            size += read
    return digest.hexdigest(), size


def _manifest_document(
    generation_id: int, manifest: dict[str, Any], extra: dict[str, Any], directory: Path
) -> dict[str, Any]:
    if not isinstance(extra, dict):
        raise TypeError(f"fill() returned {type(extra).__name__}; it must return a dict of manifest fields or None")
    _check_reserved(extra, "the fields fill() returned")
    clashes = sorted(key for key in set(manifest) & set(extra) if manifest[key] != extra[key])
    if clashes:
        raise ConflictError(f"manifest fields {clashes} are given to write() and returned by fill() with other values")
    if (directory / MANIFEST).exists():
        raise ConflictError(f"fill() wrote {MANIFEST}, which the store writes itself; return manifest fields instead")
    files = _file_table(directory)
    return {**manifest, **extra, "id": generation_id, "files": files, "checksum": _table_checksum(files)}


def _file_table(directory: Path) -> FileTable:
    table: FileTable = {}
    for name in _relative_files(directory):
        sha256, size = file_digest(directory / name)
        table[name] = {"sha256": sha256, "bytes": size}
    return table


def _relative_files(directory: Path) -> list[str]:
    """Every regular file below ``directory``, as sorted POSIX relative paths; symlinks are refused."""
    names = []
    for path in directory.rglob("*"):
        if path.is_symlink():
            raise ArtifactError(f"{path} is a symbolic link: a generation directory holds regular files only")
        if path.is_file():
            names.append(path.relative_to(directory).as_posix())
    return sorted(names)


def _table_checksum(files: FileTable) -> str:
    """SHA-256 over the sorted file table (path, sha256, bytes per file), in canonical JSON."""
    rows = [[name, files[name].get("sha256"), files[name].get("bytes")] for name in sorted(files)]
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode("utf-8")).hexdigest()


def _file_problems(path: Path, name: str, expected: dict[str, Any], deep: bool) -> list[str]:
    size = path.stat().st_size
    if size != expected.get("bytes"):
        return [f"{name}: {size} bytes, the manifest says {expected.get('bytes')}"]
    if deep and file_digest(path)[0] != expected.get("sha256"):
        return [f"{name}: sha256 does not match the manifest (the content changed)"]
    return []


def _write_durably(path: Path, text: str) -> None:
    with path.open("x", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_tree(directory: Path) -> None:
    """Flush every file, then every directory entry, so that the rename publishes complete data."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for path in [*(p for p in directory.rglob("*") if p.is_dir()), directory]:
        _fsync_directory(path)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dump(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _check_id(generation_id: int) -> None:
    if isinstance(generation_id, bool) or not isinstance(generation_id, int) or generation_id < 0:
        raise ValueError(f"generation id {generation_id!r} is not a generation id: use an integer >= 0")


def _check_reserved(fields: dict[str, Any], where: str) -> None:
    taken = [key for key in RESERVED_FIELDS if key in fields]
    if taken:
        raise ConflictError(f"{where} sets {taken}, which the store computes itself; remove them")


def _parse_id(name: str) -> int | None:
    """``"12"`` -> 12; anything else (``"012"``, ``".tmp-12-x"``, ``"notes"``) -> None."""
    return int(name) if name.isascii() and name.isdigit() and str(int(name)) == name else None
