"""Writes that readers see whole or not at all: a temporary sibling, then one rename.

Every output of the project (vectors, reports, converted models, exports, adapters, training files,
cached bench weights) goes through one of these two, so none is ever left half-written where a
reader (or a resumed run) would take it for complete. What is renamed into place has been fsync'd
(a crash right after the rename finds the data, not an empty file) and has the modes a plain
`open` / `mkdir` would give under the user's umask, not mkstemp's private 0600 / 0700.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Callable

from diffemb_jax.errors import MissingPathError, PathExistsError


def _umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting it, which
    would briefly give files that other threads create, orbax's say, the wrong modes)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    """Every file below `root`, then every folder (so their entries are on disk too)."""
    folders = []
    for folder, _, files in os.walk(root):
        folders.append(folder)
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
    for folder in reversed(folders):
        _fsync_folder(folder)


def _fsync_folder(folder: str | Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | Path, write: Callable[[IO], None], *, text: bool = False) -> Path:
    """write(f) fills a temporary file in `path`'s folder, which is then renamed to `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.absolute().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") if text else os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_folder(path.absolute().parent)
    return path


def new_directory(out: str | Path) -> Path:
    """The path of a directory to be made: refuses one that exists or whose parent folder does not."""
    out = Path(out)
    if out.exists():
        raise PathExistsError(f"{out} already exists; choose a new output directory or remove it")
    if not out.parent.is_dir():
        raise MissingPathError(f"the folder {out.parent} for {out.name} does not exist")
    return out


def write_new_directory(out: str | Path, fill: Callable[[Path], None]) -> Path:
    """write_directory into a directory that must not exist yet (an export, an adapter)."""
    return write_directory(new_directory(out), fill)


def _filled(out: Path, fill: Callable[[Path], None]) -> Path:
    """A temporary sibling of `out` that fill(tmp) has written, with the umask's mode, on disk."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def write_directory(out: str | Path, fill: Callable[[Path], None], *, another_may_win: bool = False) -> Path:
    """fill(tmp) writes the directory's files into a temporary sibling, which is then renamed to
    `out`. `another_may_win`: if another process renamed its own copy into place first, keep that."""
    out = Path(out)
    tmp = _filled(out, fill)
    try:
        os.replace(tmp, out)
    except OSError:
        if not (another_may_win and out.is_dir()):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone after the rename
    _fsync_folder(out.absolute().parent)
    return out


def replace_directory(out: str | Path, fill: Callable[[Path], None]) -> Path:
    """write_directory over a directory that may exist: the old one is renamed aside only once the new
    one is whole on disk, and deleted once the new one is in place; a crash leaves a whole copy."""
    out = Path(out)
    if not out.exists():
        return write_directory(out, fill)
    tmp, aside = _filled(out, fill), None
    try:
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, aside)
        os.replace(tmp, out)
    except BaseException:
        if aside is not None and not out.exists():
            os.replace(aside, out)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)
    _fsync_folder(out.absolute().parent)
    return out
