"""Plain text as the adaptation's rows: tokenised once, stored, served by step number.

Documents come from JSONL (a "text" field a line) or .txt files (a file a document). Each is
tokenised, cut into pieces of at most `length` tokens, and the pieces are packed several to a row by
first fit decreasing, each piece a segment of its own (attending within itself, as the train step's
texts do). The rows are stored as two int32 arrays [rows, length], ids and segment numbers (0: pad),
in a folder keyed by the files (path, size, mtime), the tokenizer and the length, so a rerun reuses
them. `BlockBatches` shuffles the rows per epoch (grain, seeded) and gives step s's global batch by
index: a resumed run needs nothing but its step to see the very rows the uninterrupted one saw.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator, Sequence

import grain
import numpy as np
import tokenizers
from tqdm.auto import tqdm

from diffemb_jax import atomic
from diffemb_jax.batching import pack_rows
from diffemb_jax.errors import ConfigError, MissingPathError, UserError

MIN_PIECE = 2  # a piece must hold a token to predict from the one before it
IDS, SEGMENTS = "input_ids.npy", "segments.npy"


class BadTextError(UserError):
    """A text file or JSONL line that cannot be used; the message names FILE:LINE."""


def read_documents(files: Sequence[str | Path]) -> Iterator[str]:
    for f in map(Path, files):
        if not f.is_file():
            raise MissingPathError(f"config.data.files: {f} does not exist")
        if f.suffix != ".jsonl":
            yield f.read_text(encoding="utf-8")
            continue
        with open(f, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError) as e:
                    raise BadTextError(f"{f}:{number}: not a JSON object with a \"text\" field ({e!r})") from None
                if not isinstance(text, str):
                    raise BadTextError(f"{f}:{number}: \"text\" must be a string, got {type(text).__name__}")
                yield text


def _fingerprint(files: Sequence[str | Path], tokenizer: tokenizers.Tokenizer, length: int) -> str:
    h = hashlib.sha256(tokenizer.to_str().encode())
    for f in map(Path, files):
        st = f.stat()
        h.update(f"{f.absolute()}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(str(length).encode())
    return h.hexdigest()[:16]


def _pieces(documents: Iterator[str], tokenizer: tokenizers.Tokenizer, length: int, progress: bool):
    chunk: list[str] = []
    bar = tqdm(desc="tokenising", unit="doc", disable=not progress)

    def cut(texts):
        for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
            ids = encoding.ids
            for start in range(0, len(ids), length):
                if len(ids) - start >= MIN_PIECE:
                    yield ids[start:start + length]
        bar.update(len(texts))

    for text in documents:
        chunk.append(text)
        if len(chunk) == 1024:
            yield from cut(chunk)
            chunk = []
    yield from cut(chunk)
    bar.close()


def build_blocks(files: Sequence[str | Path], tokenizer: tokenizers.Tokenizer, length: int, cache_dir: str | Path,
                 *, progress: bool = True) -> Path:
    """The folder of token rows for `files` (built unless it is there already)."""
    if length < MIN_PIECE:
        raise ConfigError(f"data.length must be at least {MIN_PIECE}, got {length}")
    if not [f for f in files if f]:
        raise ConfigError("config.data.files is empty: set --config.data.files=corpus.jsonl (repeat for more)")
    out = Path(cache_dir) / f"blocks-{_fingerprint(files, tokenizer, length)}"
    if (out / SEGMENTS).exists():
        return out
    pieces = list(_pieces(read_documents(files), tokenizer, length, progress))
    if not pieces:
        raise UserError(f"config.data.files {list(map(str, files))} hold no text of {MIN_PIECE} or more tokens")
    rows = pack_rows([len(p) for p in pieces], length)
    ids, segments = np.zeros((len(rows), length), np.int32), np.zeros((len(rows), length), np.int32)
    for r, row in enumerate(rows):
        at = 0
        for number, i in enumerate(row, 1):
            ids[r, at:at + len(pieces[i])] = pieces[i]
            segments[r, at:at + len(pieces[i])] = number
            at += len(pieces[i])

    def fill(tmp: Path) -> None:
        np.save(tmp / IDS, ids)
        np.save(tmp / SEGMENTS, segments)

    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic.write_directory(out, fill, another_may_win=True)


class BlockBatches:
    """This host's rows of every global batch: batch s holds rows s*G .. s*G+G-1 of its epoch's
    shuffled order (an epoch's last incomplete batch is dropped; each epoch is shuffled anew), host
    p its p-th slice of them."""

    def __init__(self, folder: str | Path, *, global_batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        folder = Path(folder)
        self.ids = np.load(folder / IDS, mmap_mode="r")
        self.segments = np.load(folder / SEGMENTS, mmap_mode="r")
        rows = len(self.ids)
        if rows < global_batch_size:
            raise UserError(f"the text makes {rows} rows of {self.ids.shape[1]} tokens, fewer than "
                             f"train.global_batch_size={global_batch_size}: give more text or a smaller batch")
        if global_batch_size % process_count:
            raise ConfigError(f"global_batch_size={global_batch_size} is not divisible by {process_count} processes")
        share = global_batch_size // process_count
        epoch = grain.MapDataset.range(rows).shuffle(seed=seed)[: rows // global_batch_size * global_batch_size]
        self._batches = epoch.batch(global_batch_size).repeat()
        self._slice = slice(process_index * share, (process_index + 1) * share)
        self.rows, self.length = rows, self.ids.shape[1]

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        index = np.sort(np.asarray(self._batches[step])[self._slice])  # sorted: the memmap reads forward
        return {"input_ids": np.asarray(self.ids[index]), "segments": np.asarray(self.segments[index])}

    def tokens(self) -> int:
        return int((self.segments > 0).sum())

    def pieces_per_row(self) -> int:
        """The most pieces a row holds (numbered 1, 2, ... in each row)."""
        return int(self.segments.max(initial=1))
