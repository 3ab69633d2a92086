"""Durable files: a failed write keeps the old file and leaves no temporary file behind,
and a finished one is fsync-ed (the file, then its folder) before it counts as written."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from client.site_norms import load_statistics, save_statistics
from common.atomic_files import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    load_arrays,
    load_npz,
    save_arrays,
    save_npz,
)
from common.data import medmnist_npz
from common.data.splits import DataFileError
from common.norm_adaptation import NormStatistics
from server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from server.run_records import write_json

OLD = b"the previous, complete content\n"


def _checkpoint(round_: int = 2) -> Checkpoint:
    return Checkpoint(run_key="run-1", fingerprint="abc", server_round=round_,
                      arrays=ArrayRecord({"w": Array(np.arange(6.0).reshape(2, 3))}))


def _arrays() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.arange(6.0).reshape(2, 3))})


WRITERS: dict[str, Callable[[Path], None]] = {
    "atomic_write_text": lambda p: atomic_write_text(p, '{"a": 1}'),
    "write_json": lambda p: write_json(p, {"a": 1}),
    "save_arrays": lambda p: save_arrays(p, _arrays()),
    "save_npz": lambda p: save_npz(p, {"w": np.ones(3)}, mode=0o600),
    "save_checkpoint": lambda p: save_checkpoint(p, _checkpoint()),
}


class DiskFull(OSError):
    """Stands in for ENOSPC halfway through a write."""


def _half_then_fail(file: Any, *args: Any, **kwargs: Any) -> None:
    """An ``np.savez`` that writes part of a zip file, then fails (a full disk)."""
    if hasattr(file, "write"):
        file.write(b"PK\x03\x04 half a zip")
    else:
        Path(file if str(file).endswith(".npz") else f"{file}.npz").write_bytes(b"PK half")
    raise DiskFull(28, "No space left on device")


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int]]]:
    """Records every os.fsync as ("file" or "dir", inode), then fsyncs for real."""
    calls: list[tuple[str, int]] = []
    real = os.fsync

    def record(fd: int) -> None:
        st = os.fstat(fd)
        calls.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    yield calls


def _leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != name)


# ------------------------------------------------------------------ the helper


def test_atomic_write_creates_the_folder_and_sets_the_mode_exactly(tmp_path: Path) -> None:
    path = tmp_path / "new" / "folder" / "ledger.json"
    old_umask = os.umask(0o077)
    try:
        atomic_write_text(path, "{}\n")
        atomic_write_bytes(tmp_path / "secret", b"x", mode=0o600)
    finally:
        os.umask(old_umask)
    assert path.read_text() == "{}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
    assert _leftovers(path.parent, path.name) == []


@pytest.mark.parametrize("error", [DiskFull(28, "No space left on device"), KeyboardInterrupt()])
def test_a_writer_that_fails_midway_keeps_the_old_file_and_no_temporary(
        tmp_path: Path, error: BaseException) -> None:
    path = tmp_path / "state.bin"
    path.write_bytes(OLD)
    seen: list[str] = []

    def write(fh: BinaryIO) -> None:
        fh.write(b"half of the new")
        fh.flush()
        seen.extend(p.name for p in tmp_path.iterdir() if p.name != path.name)
        raise error

    with pytest.raises(type(error)):
        atomic_write(path, write)
    assert path.read_bytes() == OLD
    assert len(seen) == 1 and seen[0].startswith(".state.bin") and seen[0].endswith(".tmp")
    assert _leftovers(tmp_path, path.name) == []


def test_a_failed_rename_removes_the_temporary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.bin"
    path.write_bytes(OLD)

    def no_rename(src: Any, dst: Any) -> None:
        raise PermissionError("rename refused")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(PermissionError):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == OLD
    assert _leftovers(tmp_path, path.name) == []


# ------------------------------------------------------------- every writer


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_each_durable_write_fsyncs_the_file_then_its_folder(
        tmp_path: Path, fsyncs: list[tuple[str, int]], name: str) -> None:
    path = tmp_path / "records" / f"out-{name}"
    WRITERS[name](path)
    file, folder = ("file", path.stat().st_ino), ("dir", path.parent.stat().st_ino)
    assert file in fsyncs and folder in fsyncs, fsyncs
    last_folder_sync = len(fsyncs) - 1 - fsyncs[::-1].index(folder)
    assert fsyncs.index(file) < last_folder_sync, "the folder is fsync-ed after the rename"
    assert _leftovers(path.parent, path.name) == []


def test_write_json_of_unwritable_data_keeps_the_old_history(tmp_path: Path) -> None:
    path = tmp_path / "history.json"
    path.write_bytes(OLD)
    with pytest.raises(TypeError):
        write_json(path, {"rounds": [1, 2], "bad": object()})
    assert path.read_bytes() == OLD
    assert _leftovers(tmp_path, path.name) == []


def test_write_json_writes_non_finite_floats_as_null(tmp_path: Path) -> None:
    path = tmp_path / "history.json"
    write_json(path, {"loss": float("nan"), "rounds": (1, 2)})
    assert json.loads(path.read_text()) == {"loss": None, "rounds": [1, 2]}


NPZ_WRITERS: dict[str, tuple[Callable[[Path], None], Callable[[Path], None]]] = {
    # name: (write the old file, try to write the new one)
    "save_arrays": (lambda p: save_arrays(p, ArrayRecord({"old": Array(np.zeros(3))})),
                    lambda p: save_arrays(p, _arrays())),
    "save_checkpoint": (lambda p: save_checkpoint(p, _checkpoint(round_=2)),
                        lambda p: save_checkpoint(p, _checkpoint(round_=3))),
}


@pytest.mark.parametrize("name", sorted(NPZ_WRITERS))
def test_an_npz_write_that_fails_midway_keeps_the_old_file_and_no_temporary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    write_old, write_new = NPZ_WRITERS[name]
    path = tmp_path / "state.npz"
    write_old(path)
    before = path.read_bytes()
    monkeypatch.setattr(np, "savez", _half_then_fail)
    with pytest.raises(DiskFull):
        write_new(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert _leftovers(tmp_path, path.name) == []
    if name == "save_arrays":
        assert list(load_arrays(path).keys()) == ["old"]
    else:
        back = load_checkpoint(path, "abc")
        assert back is not None and back.server_round == 2


def test_npz_files_are_plain_uncompressed_numpy_archives(tmp_path: Path) -> None:
    arrays = {"w": np.arange(6.0).reshape(2, 3), "b.mean": np.array([1, 2], dtype=np.int64)}
    save_npz(tmp_path / "mine.npz", arrays)
    with np.load(tmp_path / "mine.npz") as plain:
        assert set(plain.files) == set(arrays)
        for name, array in arrays.items():
            np.testing.assert_array_equal(plain[name], array)
            assert plain[name].dtype == array.dtype
    np.savez(tmp_path / "written-by-numpy.npz", **arrays)  # files fedshift wrote before
    back = load_npz(tmp_path / "written-by-numpy.npz")
    assert set(back) == set(arrays)
    np.testing.assert_array_equal(back["w"], arrays["w"])
    record = load_arrays(tmp_path / "written-by-numpy.npz")
    assert list(record.keys()) == ["w", "b.mean"]
    np.testing.assert_array_equal(record["w"].numpy(), arrays["w"])


def test_npz_files_with_pickled_objects_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "pickled.npz", meta=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_npz(tmp_path / "pickled.npz")


def test_a_sites_adapted_statistics_are_kept_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "adapted-norms" / "site-1-run.npz"
    statistics = {"backbone.bn1": NormStatistics(np.array([0.5, 1.0]), np.array([2.0, 3.0]))}
    save_statistics(path, statistics)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    back = load_statistics(path)
    assert back is not None and list(back) == ["backbone.bn1"]
    np.testing.assert_array_equal(back["backbone.bn1"].var, [2.0, 3.0])


# ------------------------------------------------------------------ downloads


class _Response(io.BytesIO):
    """A urlopen response that may fail after its first chunk."""

    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        super().__init__(data)
        self.fail_after = fail_after

    def read(self, size: int | None = -1) -> bytes:
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        return super().read(size)


def _serve(monkeypatch: pytest.MonkeyPatch, response: _Response) -> None:
    monkeypatch.setattr(medmnist_npz.urllib.request, "urlopen",
                        lambda url, timeout: response)


def test_a_download_takes_its_name_only_when_complete_and_verified(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsyncs: list[tuple[str, int]]) -> None:
    data = b"npz bytes " * 1000
    target = tmp_path / "data" / "x.npz"
    _serve(monkeypatch, _Response(data))
    medmnist_npz._download("https://example.org/x.npz", hashlib.md5(data).hexdigest(), target)
    assert target.read_bytes() == data
    assert ("file", target.stat().st_ino) in fsyncs
    assert ("dir", target.parent.stat().st_ino) in fsyncs
    assert _leftovers(target.parent, target.name) == []


def test_a_download_with_the_wrong_checksum_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.npz"
    _serve(monkeypatch, _Response(b"tampered"))
    with pytest.raises(DataFileError, match="checksum"):
        medmnist_npz._download("https://example.org/x.npz", "0" * 32, target)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_download_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.npz"
    _serve(monkeypatch, _Response(b"a" * 100, fail_after=10))
    with pytest.raises(ConnectionResetError):
        medmnist_npz._download("https://example.org/x.npz", None, target)
    assert list(tmp_path.iterdir()) == []
