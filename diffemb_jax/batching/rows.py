"""How many rows a batch is padded to: a few row counts, so XLA compiles a few programs.

A count is the fewest (mesh batch shards) x size that holds the rows, never past a cap (the batch's
full rows; one text a row). Two ladders of sizes are in use, each with tests asserting its counts:
the Embedder's last batch of a call takes powers of two (one program an octave; a call has one such
batch), the train step powers of two and half-way between (two programs an octave, a third more rows
at most: a step's row count changes every step). One ladder for both would change what one side's
tests assert (tests/test_embedding.py: rows / shards a power of two; tests/test_data.py: 3, 6, 12).
"""

from __future__ import annotations

from collections.abc import Iterator


def last_batch_rows(texts: int, rows: int, multiple: int = 1) -> int:
    """Padded rows of a batch of `texts` texts, fewer than its bucket's `rows`: the fewest
    multiple x 2^k that hold them (at most `rows`), so that a call's last batch computes at most twice
    its texts and the row counts compiled per bucket stay few."""
    padded = multiple
    while padded < texts:
        padded *= 2
    return min(padded, rows)


def _sizes() -> Iterator[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, ...: powers of two and half-way between."""
    yield 1
    power = 2
    while True:
        yield from (power, 3 * power // 2)
        power *= 2


def step_rows(rows: int, multiple: int, most: int) -> int:
    """The row count a step of `rows` packed rows is padded to: the fewest multiple x size (_sizes)
    that hold them (a third more at most; two programs an octave); but no more than
    `most` (one text a row) rounded up to a multiple."""
    size = next(size for size in _sizes() if size * multiple >= rows)
    return min(size * multiple, -(-most // multiple) * multiple)
