"""Files the project writes: whole or not at all, in folders proved writable before any work."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temp path beside `path` (a private name, so concurrent writers never collide) to write to; it is
    renamed over `path` when the block succeeds and removed when it fails, so no reader sees a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes files private; ours are ordinary files
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def writable_folder(path: str | os.PathLike) -> Path:
    """Create the folder and prove it writable (with a private temp name, so that many processes may check at
    once); ValueError naming the folder otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"cannot write to the output folder {path}: {e.strerror}") from None
    return path
