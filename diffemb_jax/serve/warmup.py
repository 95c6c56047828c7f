"""Warm-up: every program the Embedder can run, built before the port opens.

The Embedder's batches have rows as long as one of its buckets and, per bucket, either full rows or
one of the few padded row counts of batching/rows.py. Encoding `rows` texts of exactly `length`
token ids makes one batch of that shape (a text that long fills a row), so one encode per (bucket,
row count) builds them all; under load nothing new is compiled (metrics.py counts it)."""

from __future__ import annotations

from diffemb_jax.batching import padded_rows, rows_per_batch


def batch_shapes(embedder) -> list[tuple[int, int]]:
    """(row length, rows) of every batch the embedder can dispatch."""
    shapes = []
    for length in embedder.buckets:
        full = rows_per_batch(length, embedder.batch_size, embedder.max_batch_tokens, embedder.shards)
        shapes += [(length, rows) for rows in sorted({padded_rows(n, embedder.shards, full)
                                                      for n in range(1, full + 1)})]
    return shapes


def warm_up(embedder) -> int:
    """Encode one batch of every shape; how many shapes."""
    shapes = batch_shapes(embedder)
    for length, rows in shapes:
        embedder.encode_tokens([[0] * length] * rows, [length] * rows)
    return len(shapes)
