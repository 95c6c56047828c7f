"""Reading texts to embed and writing vectors, with errors that name the line and nothing half-written."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from diffemb_jax import atomic
from diffemb_jax.errors import UserError


class InputError(UserError):
    """Bad user input; the message names the file and line."""


def read_texts(path: str | Path) -> list[str]:
    """.txt: one text a line; .jsonl: one object a line with a string field "text"."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.suffix not in (".txt", ".jsonl"):
        raise InputError(f"{path}: input must be .txt (one text a line) or .jsonl (field \"text\")")
    texts = []
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror})") from None
    with f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{number}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
            if path.suffix == ".jsonl":
                line = _jsonl_text(path, number, line)
            if not line.strip():
                raise InputError(f"{path}:{number}: empty text; every line must hold a text")
            texts.append(line)
    if not texts:
        raise InputError(f"{path}: the file is empty; nothing to encode")
    return texts


def _jsonl_text(path: Path, number: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{number}: not valid JSON ({e.msg})") from e
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise InputError(f"{path}:{number}: expected an object with a string field \"text\"")
    return record["text"]


def check_output_path(path: str | Path, suffix: str = ".npy") -> Path:
    """Fail before any work if the output cannot be written where asked."""
    path = Path(path)
    if path.suffix != suffix:
        raise InputError(f"{path}: the output must end in {suffix}")
    if not path.parent.is_dir():
        raise InputError(f"{path}: the folder {path.parent} does not exist; create it first")
    try:  # a real file, as the write will make one: permissions, read-only file systems, quotas alike
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as e:
        raise InputError(f"{path}: cannot write in the folder {path.parent} ({e.strerror}); "
                         "choose another output") from None
    return path


def save_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    """Write to a temporary file in the same folder, then rename: readers see all or nothing."""
    atomic.write_file(path, lambda f: np.save(f, array))


def write_json_atomic(path: str | Path, record) -> None:
    """JSON (indented, NaN as null) written all or nothing, as save_npy_atomic."""
    text = json.dumps(_nan_to_none(record), indent=2) + "\n"
    atomic.write_file(path, lambda f: f.write(text), text=True)


def _nan_to_none(value):
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {str(k): _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def nonblank_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of each non-blank line, decoded as UTF-8 (a BOM is allowed)."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{number}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
            if line.strip():
                yield number, line


def jsonl_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSON-lines file; errors name the line."""
    for number, line in nonblank_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(record, dict):
            raise InputError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record
