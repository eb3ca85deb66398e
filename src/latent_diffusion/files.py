"""Files the project writes: whole or not at all, in folders proved writable before any work; and the hashes of
files it reads, as the web UI writes them."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import re
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
    except OSError as e:  # disk full, file too large, ...: say which file
        raise OSError(e.errno, f"cannot write ({e.strerror or e})", str(path)) from None
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


def missing_folders(path: str | os.PathLike) -> list[Path]:
    """The folders that creating `path` would create, deepest first (for `remove_empty` after a failed run)."""
    path = Path(path)
    return [p for p in (path, *path.parents) if not p.exists()]


def remove_empty(folders: list[Path]) -> None:
    """Remove these folders, deepest first, while they are empty: what a failed run created and did not fill."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty, or not there: it and the folders above it stay
            return


def next_index(folder: Path) -> int:
    """1 + the largest NNNNN- prefix (five digits or more) in the folder, so runs never overwrite earlier images."""
    found = [int(m.group(1)) for p in folder.iterdir() if (m := re.match(r"(\d{5,})-", p.name))]
    return max(found, default=0) + 1


def claim_numbered(folder: Path, suffix: str) -> Path:
    """folder/NNNNN-suffix with the next number, created empty under an exclusive lock on the folder (`flock` on
    its descriptor, released when it closes): runs writing into one folder at once take numbers one after another,
    so no two images share a number (their names differ in their suffix, a seed) and none is skipped. Write the
    path with `atomic_write`; unlink it if that fails."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        while True:
            path = folder / f"{next_index(folder):05d}-{suffix}"
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
                return path
            except FileExistsError:  # a writer that does not take the lock got there first: look again
                continue
    finally:
        os.close(fd)


def model_hash(path: str | os.PathLike) -> str:
    """The web UI's model hash ("AutoV2"): the first 10 hex digits of the file's SHA-256."""
    return sha256_of(path)[:10]


def legacy_model_hash(path: str | os.PathLike) -> str:
    """The web UI's old model hash (its `sd_models.model_hash`, "legacy_hash" in merge metadata): 8 hex digits of
    the SHA-256 of the 64 KiB at 1 MiB into the file."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def lora_hash(path: str | os.PathLike) -> str:
    """The web UI's "Lora hashes" value: 12 hex digits of SHA-256, for a .safetensors file over its tensor data
    only (the header skipped: kohya's "addnet" hash, which metadata edits leave unchanged)."""
    return sha256_of(path, skip_header=Path(path).suffix.lower() == ".safetensors")[:12]


def sha256_of(path: str | os.PathLike, skip_header: bool = False) -> str:
    """The file's SHA-256 in hex (computed once per version of the file: a 2 GB checkpoint takes seconds);
    skip_header: of what follows a .safetensors header."""
    stat = os.stat(path)
    return _file_hash(os.path.realpath(path), stat.st_size, stat.st_mtime_ns, skip_header)


@functools.lru_cache(maxsize=256)
def _file_hash(path: str, size: int, mtime_ns: int, skip_header: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if skip_header:
            header = int.from_bytes(f.read(8), "little")
            # a header longer than the file: not a .safetensors file (its reader says so); hash the whole file
            f.seek(8 + header if 8 + header <= size else 0)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
