"""Directories written whole or not at all: a reader never sees half of an export or an adapter."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def check_output_dir(out_dir: str | Path) -> Path:
    """A new directory's path: refuses one that exists or whose parent folder does not."""
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new output directory or remove it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the folder {out.parent} for {out.name} does not exist")
    return out


def write_atomically(out_dir: Path, fill) -> Path:
    """fill(tmp) writes the directory's files into a temporary sibling, which is then renamed to out_dir."""
    out = check_output_dir(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
