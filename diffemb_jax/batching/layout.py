"""Texts packed into rows by first fit decreasing: a row opens with the longest text left, then takes
the longest that still fits, until none does. Texts are kept by token count, so each placement costs
O(log) of the distinct counts. The Embedder packs its batches this way, the train step its texts,
into rows as long as the bucket of their longest text: a few lengths, so a few compiled programs."""

from __future__ import annotations

import bisect


def bucket_lengths(max_length: int, smallest: int = 32) -> list[int]:
    """Powers of two from `smallest` up to max_length, and max_length itself."""
    buckets, n = [], smallest
    while n < max_length:
        buckets.append(n)
        n *= 2
    return buckets + [max_length]


class TextsByLength:
    """Text indices waiting to be placed, by token count; among equal counts, in the order given."""

    def __init__(self, texts: list[int], lengths: list[int]):
        self._by_length: dict[int, list[int]] = {}
        for i in reversed(texts):  # popped from the end: the first given comes out first
            self._by_length.setdefault(lengths[i], []).append(i)
        self._present = sorted(self._by_length)

    def __bool__(self) -> bool:
        return bool(self._present)

    def longest(self) -> int:
        """The token count of the longest text left."""
        return self._present[-1]

    def fill_row(self, room: int, most: int | None = None) -> list[int]:
        """A row of at most `room` tokens (and `most` texts): the longest text left that fits, then
        the longest that fits after it, and so on."""
        row = []
        while (most is None or len(row) < most) and (k := bisect.bisect_right(self._present, room) - 1) >= 0:
            n = self._present[k]
            row.append(self._by_length[n].pop())
            room -= n
            if not self._by_length[n]:
                del self._present[k]
        return row


def pack_rows(lengths: list[int], length: int) -> list[list[int]]:
    """All texts (token counts `lengths`, each at most `length`) in as few rows of `length` tokens as
    first fit decreasing finds: each row's text indices."""
    if lengths and max(lengths) > length:
        raise ValueError(f"a text of {max(lengths)} tokens does not fit a row of {length}")
    texts, rows = TextsByLength(list(range(len(lengths))), lengths), []
    while texts:
        rows.append(texts.fill_row(length))
    return rows
