"""How many rows a batch is padded to: a few row counts, so XLA compiles a few programs.

One rule for every batch that is short of full rows (the Embedder's last batch of a call, every
train step): the fewest (mesh batch shards) x size that holds the rows, the sizes being powers of
two and half-way between (1, 2, 3, 4, 6, 8, 12, ...: two programs an octave, under half as many rows
again as there are), and never more than the batch's full rows (one text a row, rounded up to the
shards).
"""

from __future__ import annotations

from collections.abc import Iterator


def _sizes() -> Iterator[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, ...: powers of two and half-way between."""
    yield 1
    power = 2
    while True:
        yield from (power, 3 * power // 2)
        power *= 2


def padded_rows(rows: int, multiple: int, most: int) -> int:
    """The row count `rows` rows are padded to: the fewest multiple x size (_sizes) that hold them,
    but no more than `most` rounded up to a multiple."""
    size = next(size for size in _sizes() if size * multiple >= rows)
    return min(size * multiple, -(-most // multiple) * multiple)
