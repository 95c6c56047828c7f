"""The Embedder's batch plan: which texts go to which row of which batch, at what length and row count.

Texts are sorted by token length (longest first, so a shape that does not fit fails at once). Those
whose bucket length is past pack_length go one to a row, rows as long as the bucket of the batch's
first. The others are packed several to a row (first fit decreasing, layout.py; at most
MAX_TEXTS_PER_ROW a row) into rows as long as the bucket of the batch's longest. A batch has at most
batch_size rows and, where one text is not already longer, at most max_batch_tokens tokens. A batch
has its full row count, but for the last packed one and the last one-text-a-row one, padded to
padded_rows (rows.py): a one-query call computes one row, not a batch of padding.
"""

from __future__ import annotations

from diffemb_jax.batching.layout import TextsByLength
from diffemb_jax.batching.rows import padded_rows

DEFAULT_MAX_BATCH_TOKENS = 16384
# Texts up to this many tokens are packed: longer rows would make attention, whose cost per token grows
# with the row's length, a real part of the work.
PACK_LENGTH = 512
MAX_TEXTS_PER_ROW = 64  # the pooled output is [rows, this, hidden]


def row_capacity(length: int) -> int:
    """The most texts a packed row of `length` tokens holds (each has at least one token)."""
    return min(MAX_TEXTS_PER_ROW, length)


def rows_per_batch(length: int, batch_size: int, max_batch_tokens: int | None, multiple: int = 1) -> int:
    """Padded rows of a batch of `length`-token bucket: batch_size, or fewer so that rows x length
    stays within max_batch_tokens (None: no limit), yet a multiple of `multiple` (the mesh's batch
    shards) and at least that."""
    if max_batch_tokens is None:
        return batch_size
    return min(batch_size, max(multiple, max_batch_tokens // length // multiple * multiple))


def _packed_batches(texts: list[int], lengths: list[int], bucket: dict[int, int], full_rows) -> list:
    """(rows, row length, full rows) per batch: each batch's rows are as long as the bucket of the
    longest text left, and packed by first fit decreasing (layout.py), at most MAX_TEXTS_PER_ROW a row."""
    left, batches = TextsByLength(texts, lengths), []
    while left:
        length = bucket[left.longest()]
        full, most, rows = full_rows(length), row_capacity(length), []
        while left and len(rows) < full:
            rows.append(left.fill_row(length, most))
        batches.append((rows, length, full))
    return batches


def plan_batches(lengths: list[int], buckets: list[int], batch_size: int, max_batch_tokens: int | None,
                 multiple: int = 1, pack_length: int = PACK_LENGTH) -> list[tuple[list[list[int]], int, int]]:
    """(text indices of each row, row length, padded rows) per batch, longest texts first. Texts
    whose bucket is past pack_length go one to a row; the others are packed (_packed_batches)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bucket = {n: next(b for b in buckets if b >= n) for n in set(lengths)}
    alone = [i for i in order if bucket[lengths[i]] > pack_length]
    batches, start = [], 0
    while start < len(alone):
        length = bucket[lengths[alone[start]]]
        full = rows_per_batch(length, batch_size, max_batch_tokens, multiple)
        batches.append(([[i] for i in alone[start : start + full]], length, full))
        start += full
    batches += _packed_batches(order[len(alone):], lengths, bucket,
                               lambda length: rows_per_batch(length, batch_size, max_batch_tokens, multiple))
    return [(rows, length, padded_rows(len(rows), multiple, full)) for rows, length, full in batches]
