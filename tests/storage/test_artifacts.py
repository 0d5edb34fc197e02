"""The artifact store on real files: atomic writes, manifests with checksums, verification, export."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from selftune.policies.errors import ArtifactError, ConflictError
from selftune.storage.artifacts import MANIFEST, ArtifactStore, file_digest


def fill_model_like(directory: Path) -> dict:
    """Files shaped like a generation: weights, config, tokenizer, and records that export leaves out."""
    (directory / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "tokenizer.json").write_text('{"version": "1.0"}')
    (directory / "fisher.safetensors").write_bytes(b"\x01" * 100)
    (directory / "report.html").write_text("<html></html>")
    (directory / "adapter").mkdir()
    (directory / "adapter" / "adapter_config.json").write_text("{}")
    return {"params": 1234}


def write_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "generations")


def test_write_then_verify_returns_the_manifest_with_files_and_checksum(store: ArtifactStore) -> None:
    path = store.write(0, fill_model_like, {"branch": "main", "parent": None})

    assert path == store.root / "0"
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest == store.verify(0)
    assert manifest["id"] == 0 and manifest["branch"] == "main" and manifest["params"] == 1234
    assert list(manifest["files"]) == sorted(
        ["adapter/adapter_config.json", "config.json", "fisher.safetensors", "model.safetensors",
         "report.html", "tokenizer.json"]
    )
    weights = bytes(range(256)) * 64
    assert manifest["files"]["model.safetensors"] == {"sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights)}
    assert len(manifest["checksum"]) == 64
    assert store.ids() == [0]
    assert store.path(0) == path
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp-")]


def test_the_checksum_depends_on_every_file(store: ArtifactStore) -> None:
    store.write(1, lambda d: write_file(d / "a.bin", b"one"), {})
    store.write(2, lambda d: write_file(d / "a.bin", b"two"), {})
    assert store.verify(1)["checksum"] != store.verify(2)["checksum"]


def test_an_existing_id_is_refused_and_left_unchanged(store: ArtifactStore) -> None:
    store.write(3, fill_model_like, {"branch": "main"})
    before = (store.root / "3" / MANIFEST).read_bytes()
    with pytest.raises(ConflictError, match="generation 3 already exists"):
        store.write(3, fill_model_like, {"branch": "other"})
    assert (store.root / "3" / MANIFEST).read_bytes() == before
    assert store.verify(3)["branch"] == "main"


def test_one_changed_byte_fails_deep_verification_naming_the_file(store: ArtifactStore) -> None:
    path = store.write(4, fill_model_like, {})
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[1000] ^= 0xFF
    weights.write_bytes(bytes(data))

    with pytest.raises(ArtifactError, match=r"generation 4 .*\n.*model\.safetensors: sha256 does not match"):
        store.verify(4)
    assert store.path(4) == path  # same size: the shallow check cannot see it, by design


def test_a_truncated_missing_or_extra_file_is_named(store: ArtifactStore) -> None:
    path = store.write(5, fill_model_like, {})
    (path / "config.json").write_text("{}")
    (path / "tokenizer.json").unlink()
    (path / "stray.txt").write_text("x")

    with pytest.raises(ArtifactError) as raised:
        store.path(5)
    message = str(raised.value)
    assert "generation 5" in message
    assert "config.json: 2 bytes, the manifest says 23" in message
    assert "tokenizer.json: missing" in message
    assert "stray.txt: not in the manifest" in message


def test_an_edited_file_table_is_caught_by_the_checksum(store: ArtifactStore) -> None:
    path = store.write(6, fill_model_like, {})
    manifest = json.loads((path / MANIFEST).read_text())
    (path / "config.json").write_text('{"model_type": "LLAMA"}')
    manifest["files"]["config.json"]["sha256"] = file_digest(path / "config.json")[0]
    (path / MANIFEST).write_text(json.dumps(manifest))

    with pytest.raises(ArtifactError, match="checksum does not match its file table"):
        store.verify(6)


def test_a_directory_without_manifest_does_not_exist(store: ArtifactStore) -> None:
    store.write(7, fill_model_like, {})
    (store.root / "8").mkdir()
    (store.root / "8" / "model.safetensors").write_bytes(b"half")
    (store.root / "9").mkdir()
    (store.root / "9" / MANIFEST).write_text("{not json")
    (store.root / "notes").mkdir()
    (store.root / "010").mkdir()

    assert store.ids() == [7]
    with pytest.raises(ArtifactError, match=r"generation 8 .*generation\.json is missing"):
        store.verify(8)
    with pytest.raises(ArtifactError, match="generation 9 .*not a manifest"):
        store.path(9)
    with pytest.raises(ArtifactError, match="generation 11 has no directory"):
        store.path(11)


def test_an_exception_in_fill_leaves_nothing_behind(store: ArtifactStore) -> None:
    def failing_fill(directory: Path) -> dict:
        (directory / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("training died")

    with pytest.raises(RuntimeError, match="training died"):
        store.write(10, failing_fill, {})
    assert not (store.root / "10").exists()
    assert store.ids() == []
    assert list(store.root.iterdir()) == []


def test_a_crashed_write_leaves_only_a_temporary_that_clean_removes(store: ArtifactStore) -> None:
    # A real crash: the process dies inside fill, so no Python cleanup runs.
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from selftune.storage.artifacts import ArtifactStore

        def dying_fill(directory):
            (directory / "model.safetensors").write_bytes(b"partial")
            os._exit(9)

        ArtifactStore(Path({str(store.root)!r})).write(12, dying_fill, {{}})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 9, result.stderr

    leftovers = list(store.root.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-12-")
    assert not (store.root / "12").exists()
    assert store.ids() == []
    assert store.clean_temporaries() == leftovers
    assert list(store.root.iterdir()) == []
    store.write(12, fill_model_like, {})  # the id is free again
    assert store.ids() == [12]


def test_reserved_and_clashing_manifest_fields_are_refused(store: ArtifactStore) -> None:
    with pytest.raises(ConflictError, match="'checksum'"):
        store.write(13, fill_model_like, {"checksum": "mine"})
    with pytest.raises(ConflictError, match="'params'"):
        store.write(13, fill_model_like, {"params": 99})
    with pytest.raises(ConflictError, match="fill\\(\\) wrote generation.json"):
        store.write(13, lambda d: write_file(d / MANIFEST, b"{}"), {})
    with pytest.raises(ValueError, match="generation id -1"):
        store.write(-1, fill_model_like, {})
    assert store.ids() == [] and list(store.root.iterdir()) == []


def test_export_copies_model_files_and_manifest_only(store: ArtifactStore, tmp_path: Path) -> None:
    path = store.write(14, fill_model_like, {"branch": "main"})
    dest = store.export(14, tmp_path / "exported")

    assert sorted(p.name for p in dest.iterdir()) == ["config.json", MANIFEST, "model.safetensors", "tokenizer.json"]
    for name in ("config.json", MANIFEST, "model.safetensors", "tokenizer.json"):
        assert (dest / name).read_bytes() == (path / name).read_bytes()


def test_export_refuses_a_non_empty_destination_and_a_damaged_generation(
    store: ArtifactStore, tmp_path: Path
) -> None:
    path = store.write(15, fill_model_like, {})
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ConflictError, match=f"{busy} exists and is not an empty directory"):
        store.export(15, busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]

    data = bytearray((path / "model.safetensors").read_bytes())
    data[0] ^= 1
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.safetensors: sha256"):
        store.export(15, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    data[0] ^= 1  # repaired: the export goes through
    (path / "model.safetensors").write_bytes(bytes(data))
    assert (store.export(15, empty) / MANIFEST).is_file()


def test_streaming_digest_matches_hashlib_across_chunk_boundaries(tmp_path: Path) -> None:
    data = bytes(range(251)) * 12_600  # ~3 MiB, not a multiple of the 1 MiB chunk
    target = tmp_path / "big.bin"
    target.write_bytes(data)
    assert file_digest(target) == (hashlib.sha256(data).hexdigest(), len(data))
