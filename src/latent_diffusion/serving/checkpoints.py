"""The checkpoints `ldm serve` can switch to: the files of `--models-dir` and the one it started with, by the names
the web UI's clients use for them."""

from __future__ import annotations

from pathlib import Path

from .http_edge import NotFound

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """The checkpoint files of a folder and its subfolders, by name relative to it ("sub/name.safetensors")."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in CHECKPOINT_SUFFIXES and p.is_file())
    return {p.relative_to(folder).as_posix(): p for p in paths}


class Checkpoints:
    """The checkpoints the server can load: the files of `--models-dir` (and its subfolders) and the one it started
    with. Requests name one by its title ("sub/name.safetensors [hash]"), file name, or name without suffix;
    nothing a request sends reaches the file system except as a key of this table."""

    def __init__(self, models_dir: Path | None, first: Path):
        self.models_dir, self.first = models_dir, first
        self.hashes: dict[Path, str] = {}  # files hashed once loaded (hashing a 2 GB file takes seconds)

    def files(self) -> dict[str, Path]:
        """Name (relative to the folder) -> path."""
        return {self.first.name: self.first} | (checkpoint_files(self.models_dir) if self.models_dir else {})

    def title(self, name: str, path: Path) -> str:
        return f"{name} [{self.hashes[path]}]" if path in self.hashes else name

    def find(self, wanted: str) -> Path:
        for name, path in self.files().items():
            if wanted in (name, self.title(name, path), Path(name).stem, Path(name).with_suffix("").as_posix()):
                return path
        raise NotFound(f"no checkpoint named {wanted!r}; GET /sdapi/v1/sd-models lists them")

    def listing(self) -> list[dict]:
        """/sdapi/v1/sd-models: each file, by its title (with its hash once it has been loaded)."""
        return [
            {
                "title": self.title(name, path),
                "model_name": Path(name).with_suffix("").as_posix(),
                "hash": self.hashes.get(path),
                "sha256": None,
                "filename": str(path),
                "config": None,
            }
            for name, path in self.files().items()
        ]

    def name_of(self, path: Path) -> str:
        return next((n for n, p in self.files().items() if p == path), path.name)
