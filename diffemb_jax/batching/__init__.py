"""Texts into rows: the one place that decides how token ids become the arrays a compiled program takes.

A low floor, numpy and the standard library alone: the Embedder, the trainer and the bench import it.
- layout.py: first fit decreasing (which texts share a row) and the bucket lengths rows take;
- rows.py: how many rows a batch is padded to, so that few programs are compiled;
- arrays.py: token ids into int32 [rows, length] arrays, each token with its text's number;
- encode.py: the Embedder's batch plan;
- step.py: the train step's rows, texts numbered across the global batch.
"""

from diffemb_jax.batching.arrays import pack_batch, pad_batch, pad_rows
from diffemb_jax.batching.encode import (DEFAULT_MAX_BATCH_TOKENS, MAX_TEXTS_PER_ROW, PACK_LENGTH, plan_batches,
                                         row_capacity, rows_per_batch)
from diffemb_jax.batching.layout import TextsByLength, bucket_lengths, pack_rows
from diffemb_jax.batching.rows import padded_rows
from diffemb_jax.batching.step import (SHORTEST_ROW, SIDES, STEP_KEYS, pack_step, packs, row_length, step_shapes,
                                       text_numbers, texts_per_row)

__all__ = ["DEFAULT_MAX_BATCH_TOKENS", "MAX_TEXTS_PER_ROW", "PACK_LENGTH", "SHORTEST_ROW", "SIDES", "STEP_KEYS",
           "TextsByLength", "bucket_lengths", "pack_batch", "pack_rows", "pack_step", "packs", "pad_batch",
           "pad_rows", "padded_rows", "plan_batches", "row_capacity", "row_length", "rows_per_batch", "step_shapes",
           "text_numbers", "texts_per_row"]
