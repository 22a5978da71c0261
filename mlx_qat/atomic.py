"""Atomic writes: a file or directory is written beside its final place and renamed into it, so
a process killed at any moment leaves either the old version or the new one whole."""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_line(path: Path, line: str) -> None:
    """Append one line by rewriting the file: a kill leaves the file with or without the line,
    never half of it (for small record files, not per-step logs)."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    write_text(path, old + line.rstrip("\n") + "\n")


def previous(path: Path) -> Path:
    """Where `directory` keeps the old version during the swap."""
    return Path(path).with_name(f"{Path(path).name}.old")


def sync(directory: Path) -> None:
    """Flush a directory's files to the disk: renamed into place unflushed, a file may come back
    empty or short after a crash of the machine, under a name that says it is complete."""
    for file in Path(directory).iterdir():
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def _sync_entries(directory: Path) -> None:
    """Flush a directory's own entries (the renames into it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def directory(path: Path, overwrite: bool = True, keep_previous: bool = False) -> Iterator[Path]:
    """Yield an empty directory beside `path`; when the block ends without error, it replaces
    `path`. The old version stays at `previous(path)` during the two renames of the swap, and
    after it with `keep_previous` (until the next swap), to fall back on."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or remove it first")
    tmp, old = path.with_name(f".{path.name}.tmp"), previous(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)  # mode 0777 less the umask, like any other output
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    _sync_entries(path.parent)
    if not keep_previous:
        shutil.rmtree(old, ignore_errors=True)


def set_aside(path: Path) -> Path:
    """Move `path` to `<path>.corrupt` (replacing an earlier one there): out of the way of what
    reads or rotates it, kept for a look."""
    aside = Path(path).with_name(f"{Path(path).name}.corrupt")
    shutil.rmtree(aside, ignore_errors=True)
    Path(path).rename(aside)
    return aside
