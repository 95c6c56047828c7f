"""Embedder.encode: texts -> L2-normalised float32 vectors, with a handful of compiled shapes.

Texts are sorted by token length (longest first, so a shape that does not fit fails at once), cut
into batches, and each batch is right-padded to the smallest bucket length that holds it. A batch
holds at most batch_size texts and, where one text is not already longer, at most max_batch_tokens
padded tokens: long documents go a few at a time, short texts batch_size at a time. A batch has its
bucket's full row count, but for the last of a call, which is padded to the fewest rows of the form
(mesh batch shards) x 2^k that hold its texts: a one-query call computes one row, not a batch of
padding, and XLA compiles a few programs per bucket at most. Each batch is dispatched
before the previous one's vectors are fetched, so the host pads and sends the next batch while the
device computes. Rows come back in input order.
On a mesh, parameters are sharded by their logical axes and every batch is split over the data
(and fsdp) axes; each process gets the whole result back.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import numpy as np
import tokenizers
from flax import nnx
from tqdm.auto import tqdm

from diffemb_jax import parallel
from diffemb_jax.embedding.pooling import POOLING_MODES, l2_normalize, pool
from diffemb_jax.embedding.prompts import pad_batch, tokenize, with_instruction
from diffemb_jax.model import ATTENTION_MODES, Decoder

log = logging.getLogger(__name__)


def bucket_lengths(max_length: int, smallest: int = 32) -> list[int]:
    """Powers of two from `smallest` up to max_length, and max_length itself."""
    buckets, n = [], smallest
    while n < max_length:
        buckets.append(n)
        n *= 2
    return buckets + [max_length]


DEFAULT_MAX_BATCH_TOKENS = 16384


def rows_per_batch(length: int, batch_size: int, max_batch_tokens: int | None, multiple: int = 1) -> int:
    """Padded rows of a batch of `length`-token bucket: batch_size, or fewer so that rows x length
    stays within max_batch_tokens (None: no limit), yet a multiple of `multiple` (the mesh's batch
    shards) and at least that."""
    if max_batch_tokens is None:
        return batch_size
    return min(batch_size, max(multiple, max_batch_tokens // length // multiple * multiple))


def last_batch_rows(texts: int, rows: int, multiple: int = 1) -> int:
    """Padded rows of a batch of `texts` texts, fewer than its bucket's `rows`: the fewest
    multiple x 2^k that hold them (at most `rows`), so that a call's last batch computes at most twice
    its texts and the row counts compiled per bucket stay few."""
    padded = multiple
    while padded < texts:
        padded *= 2
    return min(padded, rows)


def plan_batches(lengths: list[int], buckets: list[int], batch_size: int, max_batch_tokens: int | None,
                 multiple: int = 1) -> list[tuple[list[int], int, int]]:
    """(text indices, bucket length, padded rows) per batch, longest texts first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, start = [], 0
    while start < len(order):
        length = next(b for b in buckets if b >= lengths[order[start]])
        rows = rows_per_batch(length, batch_size, max_batch_tokens, multiple)
        indices = order[start : start + rows]
        batches.append((indices, length, last_batch_rows(len(indices), rows, multiple)))
        start += rows
    return batches


class Embedder:
    def __init__(self, model: Decoder, tokenizer: tokenizers.Tokenizer, *, pooling: str = "mean",
                 skip_instruction: bool = False, max_length: int = 512, batch_size: int = 16,
                 max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS, mesh: jax.sharding.Mesh | None = None):
        if pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLING_MODES}")
        if model.attention not in ATTENTION_MODES:
            raise ValueError(f"unknown attention {model.attention!r}; choose one of {ATTENTION_MODES}")
        if max_length < 1 or batch_size < 1 or (max_batch_tokens is not None and max_batch_tokens < 1):
            raise ValueError("max_length, batch_size and max_batch_tokens must be positive")
        shards = mesh.shape["data"] * mesh.shape["fsdp"] if mesh is not None else 1
        if batch_size % shards:
            raise ValueError(f"batch_size={batch_size} is not divisible by the {shards} batch shards of the mesh")
        self.shards, self.max_batch_tokens = shards, max_batch_tokens
        self.mesh = mesh
        self.model, self.tokenizer = model, tokenizer
        self.pooling, self.skip_instruction = pooling, skip_instruction
        self.max_length, self.batch_size = max_length, batch_size
        self.buckets = bucket_lengths(max_length)
        graphdef, self._state = nnx.split(model)

        def embed(state, input_ids, padding_mask, embed_mask):
            hidden = nnx.merge(graphdef, state)(input_ids, padding_mask)
            return l2_normalize(pool(hidden, padding_mask, embed_mask, pooling, skip_instruction))

        self._embed = jax.jit(embed)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, adapter: str | Path | None = None, attention: str = "bidirectional",
                        dtype: str = "float32", kernel: str = "auto", mesh: jax.sharding.Mesh | None = None,
                        **kwargs) -> "Embedder":
        """A model directory or .gguf, with a PEFT LoRA `adapter` directory merged into its weights if given."""
        from conversion import load_model  # conversion knows the model; the model knows nothing of it

        if mesh is None:
            model, tokenizer = load_model(path, dtype=dtype)
        else:
            model, tokenizer = load_model(path, dtype=dtype, sharding_for=parallel.param_sharding(mesh))
        if adapter is not None:
            from conversion.peft_adapters import merged_from_peft

            model = merged_from_peft(model, adapter)
        model.attention, model.kernel = attention, kernel
        return cls(model, tokenizer, mesh=mesh, **kwargs)

    def _dispatch(self, batch):
        """Start the batch on the device and return at once (JAX dispatches asynchronously)."""
        if self.mesh is None:
            return self._embed(self._state, *batch)
        placed = jax.device_put(batch, parallel.batch_sharding(self.mesh))
        with jax.set_mesh(self.mesh):  # kernels that need it (splash) find the mesh
            return self._embed(self._state, *placed)

    def _fetch(self, vectors) -> np.ndarray:
        """Wait for a dispatched batch; on a mesh every process gets all rows."""
        if self.mesh is None:
            return np.asarray(vectors)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(vectors, tiled=True))

    def encode(self, texts: list[str], instruction: str | None = None, *, progress: bool = True) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.model.cfg.hidden_size), np.float32)
        tokens = tokenize(self.tokenizer, [with_instruction(t, instruction) for t in texts], self.max_length)
        empty = [i for i, row in enumerate(tokens.ids) if not row]
        if empty:
            raise ValueError(f"texts at positions {empty[:10]} give no tokens at all; remove or fill them")
        if tokens.truncated:
            log.warning("%d of %d texts were longer than max_length=%d tokens and were truncated",
                        tokens.truncated, len(texts), self.max_length)
        plan = plan_batches([len(row) for row in tokens.ids], self.buckets, self.batch_size,
                            self.max_batch_tokens, self.shards)
        out = np.zeros((len(texts), self.model.cfg.hidden_size), np.float32)
        pending = None  # (indices, vectors) of the batch on the device while the next one is padded and sent
        with tqdm(total=len(texts), desc="encoding", unit="text", disable=not progress) as bar:
            for indices, length, rows in [*plan, (None, None, None)]:
                dispatched = None
                if indices:
                    batch = pad_batch([tokens.ids[i] for i in indices], [tokens.embed_lengths[i] for i in indices],
                                      length, rows)
                    dispatched = (indices, self._dispatch(batch))
                if pending is not None:
                    done, vectors = pending
                    out[done] = self._fetch(vectors)[: len(done)]
                    bar.update(len(done))
                pending = dispatched
        return out
