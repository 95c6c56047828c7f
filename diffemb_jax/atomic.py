"""Writes that readers see whole or not at all: a temporary sibling, then one rename.

Every output of the project (vectors, reports, converted models, exports, adapters, training files,
cached bench weights) goes through one of these two, so none is ever left half-written where a
reader (or a resumed run) would take it for complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, IO


def write_file(path: str | Path, write: Callable[[IO], None], *, text: bool = False) -> Path:
    """write(f) fills a temporary file in `path`'s folder, which is then renamed to `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.absolute().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") if text else os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def write_directory(out: str | Path, fill: Callable[[Path], None], *, another_may_win: bool = False) -> Path:
    """fill(tmp) writes the directory's files into a temporary sibling, which is then renamed to
    `out`. `another_may_win`: if another process renamed its own copy into place first, keep that."""
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (another_may_win and out.is_dir()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone after the rename
    return out
