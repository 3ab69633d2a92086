"""Durable, atomic file writes: a crash leaves either the old file or the new one.

Every file fedshift must not lose or tear (checkpoints, run history, final
parameters, privacy ledgers, downloaded data) is written through
:func:`atomic_write`:

1. the parent directory is created when missing;
2. the content goes to a temporary file in the same directory (same file system,
   so the rename below is atomic), named ``.<name>XXXXXXXX.tmp``;
3. the temporary file is flushed and ``fsync``-ed, then renamed onto the target
   with :func:`os.replace`;
4. the directory is ``fsync``-ed, so the rename itself survives a power cut.

On any exception, ``KeyboardInterrupt`` included, the temporary file is removed
and the exception re-raised; the target keeps its previous content (or stays
absent). Readers never see a partly written file under the target's name.

Named arrays (final parameters, a site's own model, its personal scale/shift, its
adapted normalisation statistics) are kept as uncompressed npz files keyed by
name: :func:`save_npz` writes one this way and :func:`load_npz` reads it back;
:func:`save_arrays` and :func:`load_arrays` do the same for a Flower ArrayRecord.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
from flwr.app import Array, ArrayRecord

__all__ = [
    "atomic_write", "atomic_write_bytes", "atomic_write_text", "fsync_directory",
    "load_arrays", "load_npz", "save_arrays", "save_npz",
]


def fsync_directory(directory: Path) -> None:
    """Flush ``directory``'s entries (a rename or a new file in it) to disk."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], None], mode: int = 0o644) -> None:
    """Write ``path`` atomically and durably with ``write(fh)``.

    Parameters
    ----------
    path : Path
        The file to (re)place. Its parent directory is created when missing.
    write : callable
        Called once with a binary file open for writing (seekable, at offset 0);
        it writes the whole content. Raising from it leaves ``path`` as it was.
    mode : int (default: 0o644)
        Permission bits of the new file, set exactly (the umask does not apply).
        Use 0o600 for files only their owner may read.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically and durably (see :func:`atomic_write`)."""
    def write(fh: BinaryIO) -> None:
        fh.write(data)

    atomic_write(path, write, mode)


def atomic_write_text(path: Path, text: str, mode: int = 0o644, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically and durably (see :func:`atomic_write`)."""
    atomic_write_bytes(path, text.encode(encoding), mode)


def save_npz(path: Path, arrays: Mapping[str, np.ndarray], mode: int = 0o644) -> None:
    """Write ``arrays`` (name -> array) to ``path`` as an uncompressed npz file, atomically
    and durably (see :func:`atomic_write`; ``mode`` 0o600 for a site's own files)."""
    atomic_write(path, lambda fh: np.savez(fh, **arrays), mode)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays (name -> array) of the npz file at ``path``, as :func:`save_npz` wrote
    them. Pickled objects are refused."""
    with np.load(path, allow_pickle=False) as saved:
        return {name: saved[name] for name in saved.files}


def save_arrays(path: Path, arrays: ArrayRecord, mode: int = 0o644) -> None:
    """Write a Flower ArrayRecord to ``path`` as an npz file keyed by array name
    (:func:`save_npz`)."""
    save_npz(path, {name: array.numpy() for name, array in arrays.items()}, mode)


def load_arrays(path: Path) -> ArrayRecord:
    """The ArrayRecord :func:`save_arrays` wrote to ``path``."""
    return ArrayRecord({name: Array(array) for name, array in load_npz(path).items()})
