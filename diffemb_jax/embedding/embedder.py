"""Embedder.encode: texts -> L2-normalised float32 vectors, with a handful of compiled shapes.

Texts are sorted by token length (longest first, so a shape that does not fit fails at once). Those
whose bucket length (powers of two, and max_length) is past pack_length go one to a row, right-padded
to the bucket that holds the batch's first. The others are packed several to a row (first fit
decreasing, at most MAX_TEXTS_PER_ROW a row: batching/encode.py plans the batches) into rows as long
as the bucket of the batch's longest; each text attends only within itself and is pooled apart, so
short texts compute next to no padding. A batch has at most batch_size rows and, where one text is
not already longer, at most max_batch_tokens tokens: long documents go a few at a time. A batch has
its full row count, but for the last packed one and the last one-text-a-row one, which are padded by
the one rule of batching/rows.py (the fewest (mesh batch shards) x (2^k or 3 x 2^k) rows that hold
their texts): a one-query call computes one row, not a batch of padding, and XLA compiles a few
programs per bucket at most. Each batch is dispatched
before the previous one's vectors are fetched, so the host pads and sends the next batch while the
device computes. Rows come back in input order.
On a mesh, parameters are sharded by their logical axes and every batch is split over the data
(and fsdp) axes; each process gets the whole result back.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx
from tqdm.auto import tqdm

from diffemb_jax import parallel
from diffemb_jax.batching import (DEFAULT_MAX_BATCH_TOKENS, PACK_LENGTH, bucket_lengths, pack_batch, plan_batches,
                                  row_capacity)
from diffemb_jax.checkpoints import load_model
from diffemb_jax.checkpoints.checkpoint import resolve
from diffemb_jax.checkpoints.dtypes import DTYPE_CHOICES
from diffemb_jax.checkpoints.sentence_transformers import is_sentence_transformers, read_folder
from diffemb_jax.embedding.pooling import POOLING_MODES, l2_normalize, pool
from diffemb_jax.embedding.prompts import tokenize, tokenize_with_prompt, with_instruction
from diffemb_jax.errors import ConfigError, UserError, check_choice
from diffemb_jax.model import Decoder, ForwardOptions

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=16)
def _embed_program(graphdef, options: ForwardOptions, pooling: str, skip_instruction: bool):
    """The jitted embedding of one model architecture: shared by every Embedder of it (an evaluation
    before and after training, one per seed), so each batch shape compiles once a process."""

    def embed(state, input_ids, segment_ids, embed_mask, texts_per_row):
        """(unit vectors [rows, D], or packed (texts_per_row > 1) [rows, texts_per_row, D]; the pooled
        vectors' norms [rows] or [rows, texts_per_row]): the norms cost nothing more, and with them a
        caller has the un-normalised pooled vectors too (the server's normalize=false)."""
        packed = texts_per_row > 1
        hidden = nnx.merge(graphdef, state)(input_ids, segment_ids, options, texts_per_row=texts_per_row)
        pooled = pool(hidden, segment_ids, embed_mask, pooling, skip_instruction,
                      texts_per_row=texts_per_row if packed else None)
        return l2_normalize(pooled), jnp.linalg.norm(pooled, axis=-1)

    return jax.jit(embed, static_argnums=4)


FOLDER_SETTINGS = ("pooling", "skip_instruction", "max_length", "prompt")  # what a sentence-transformers folder sets


def _folder_settings(path: Path, prompt_name: str | None) -> dict:
    """The attention and Embedder settings a sentence-transformers folder gives; {} for other models."""
    if not is_sentence_transformers(path):
        if prompt_name is not None:
            raise ConfigError(f"prompt name {prompt_name!r}: {path} is not a sentence-transformers folder (it has no "
                             "modules.json), so it has no named prompts; give an instruction instead")
        return {}
    folder = read_folder(path)
    if not folder.normalize:
        log.warning("%s has no Normalize module: sentence-transformers gives its vectors unnormalised, this project "
                    "L2-normalised (the same directions)", path)
    settings = {"attention": "causal", "pooling": folder.pooling, "skip_instruction": not folder.include_prompt,
                "prompt": folder.prompt(prompt_name)}
    if folder.max_seq_length is not None:
        settings["max_length"] = folder.max_seq_length
    return settings


class Embedder:
    def __init__(self, model: Decoder, tokenizer: tokenizers.Tokenizer, *, pooling: str = "mean",
                 skip_instruction: bool = False, max_length: int = 512, batch_size: int = 16,
                 max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS, pack_length: int = PACK_LENGTH,
                 mesh: jax.sharding.Mesh | None = None, options: ForwardOptions = ForwardOptions(),
                 prompt: str | None = None):
        """`prompt`: a sentence-transformers prompt, put verbatim before every text encoded without an
        instruction (its tokens are the instruction skip_instruction skips); None: the recipe's format."""
        if pooling not in POOLING_MODES:
            raise ConfigError(f"unknown pooling {pooling!r}; choose one of {POOLING_MODES}")
        if max_length < 1 or batch_size < 1 or (max_batch_tokens is not None and max_batch_tokens < 1):
            raise ConfigError("max_length, batch_size and max_batch_tokens must be positive")
        if pack_length < 0:
            raise ConfigError(f"pack_length must be >= 0 (0: one text a row), got {pack_length}")
        shards = parallel.batch_shards(mesh) if mesh is not None else 1
        if batch_size % shards:
            raise ConfigError(f"batch_size={batch_size} is not divisible by the {shards} batch shards of the mesh")
        self.shards, self.max_batch_tokens, self.pack_length = shards, max_batch_tokens, pack_length
        self.mesh = mesh
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.pooling, self.skip_instruction, self.prompt = pooling, skip_instruction, prompt
        self.max_length, self.batch_size = max_length, batch_size
        self.buckets = bucket_lengths(max_length)
        graphdef, self._state = nnx.split(model)
        self._embed = _embed_program(graphdef, options, pooling, skip_instruction)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, adapter=None, attention: str | None = None,
                        dtype: str = "auto", kernel: str = "auto", mesh: jax.sharding.Mesh | None = None,
                        prompt_name: str | None = None, scan_layers: bool = False,
                        **kwargs) -> "Embedder":
        """A model path (checkpoints.load_model's: a PEFT adapter folder too), with a PEFT LoRA `adapter`
        directory, or a list of them in order, merged into its weights if given; dtype auto: bfloat16
        on a GPU or TPU, float32 on a CPU (checkpoints/dtypes.py).
        A sentence-transformers folder sets what it says (causal attention, as sentence-transformers runs
        a decoder; its pooling, include_prompt, max_seq_length and default prompt, or `prompt_name`'s);
        attention, pooling, skip_instruction, max_length and prompt given (not None) win. Elsewhere
        attention defaults to bidirectional."""
        settings = _folder_settings(resolve(path), prompt_name)
        attention = attention or settings.get("attention", "bidirectional")
        for key in FOLDER_SETTINGS:
            if kwargs.get(key) is None:  # not given: the folder's, else the constructor's default
                kwargs.pop(key, None)
                if key in settings:
                    kwargs[key] = settings[key]
        # checked before any weight is read
        options = ForwardOptions(attention=attention, kernel=kernel, scan_layers=scan_layers)
        check_choice("pooling", kwargs.get("pooling", "mean"), POOLING_MODES)
        check_choice("dtype", dtype, DTYPE_CHOICES)
        sharding_for = parallel.single_device if mesh is None else parallel.param_sharding(mesh)
        model, tokenizer = load_model(path, adapters=adapter, dtype=dtype, sharding_for=sharding_for)
        return cls(model, tokenizer, mesh=mesh, options=options, **kwargs)

    def compiled_for(self, length: int, rows: int = 1):
        """The program that embeds `rows` rows of `length` tokens, one text a row: compiled, not run,
        and from shapes alone (the model may be abstract, nnx.eval_shape's), so its memory_analysis()
        says what such a batch needs before any weights are read."""
        tokens = jax.ShapeDtypeStruct((rows, length), np.int32,
                                      sharding=None if self.mesh is None else parallel.batch_sharding(self.mesh))
        with contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh):
            return self._embed.lower(self._state, tokens, tokens, tokens, 1).compile()

    def _dispatch(self, batch, texts_per_row: int):
        """Start the batch on the device and return at once (JAX dispatches asynchronously)."""
        if self.mesh is None:
            return self._embed(self._state, *batch, texts_per_row)
        placed = jax.device_put(batch, parallel.batch_sharding(self.mesh))
        with jax.set_mesh(self.mesh):  # kernels that need it (splash) find the mesh
            return self._embed(self._state, *placed, texts_per_row)

    def _fetch(self, outputs) -> tuple[np.ndarray, np.ndarray]:
        """Wait for a dispatched batch's (vectors, norms); on a mesh every process gets all rows."""
        if self.mesh is None:
            return tuple(np.asarray(x) for x in outputs)
        from jax.experimental import multihost_utils

        return tuple(np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in outputs)

    def encode(self, texts: list[str], instruction: str | None = None, *, progress: bool = True) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.model.cfg.hidden_size), np.float32)
        if instruction is None and self.prompt is not None:
            tokens = tokenize_with_prompt(self.tokenizer, texts, self.prompt, self.max_length)
        else:
            tokens = tokenize(self.tokenizer, [with_instruction(t, instruction) for t in texts], self.max_length)
        empty = [i for i, row in enumerate(tokens.ids) if not row]
        if empty:
            raise UserError(f"texts at positions {empty[:10]} give no tokens at all; remove or fill them")
        if tokens.truncated:
            log.warning("%d of %d texts were longer than max_length=%d tokens and were truncated",
                        tokens.truncated, len(texts), self.max_length)
        return self.encode_tokens(tokens.ids, tokens.embed_lengths, progress=progress)

    def encode_tokens(self, ids: list[list[int]], embed_lengths: list[int], *, progress: bool = False) -> np.ndarray:
        """Already tokenised texts (each 1..max_length ids; the last embed_lengths[i] of them form
        the embed mask) -> their vectors, in order: encode's batching, without its
        prompt and tokeniser (the server tokenises each request itself, then encodes many together)."""
        return self.encode_tokens_with_norms(ids, embed_lengths, progress=progress)[0]

    def encode_tokens_with_norms(self, ids: list[list[int]], embed_lengths: list[int], *,
                                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """encode_tokens' unit vectors [N, D] and the norms [N] of the pooled vectors they are the
        directions of (vectors x norms[:, None] are the pooled vectors, un-normalised)."""
        width = self.model.cfg.hidden_size
        if not ids:
            return np.zeros((0, width), np.float32), np.zeros((0,), np.float32)
        bad = [i for i, row in enumerate(ids) if not 1 <= len(row) <= self.max_length]
        if bad:
            raise UserError(f"token lists at positions {bad[:10]} are empty or longer than "
                             f"max_length={self.max_length}")
        plan = plan_batches([len(row) for row in ids], self.buckets, self.batch_size,
                            self.max_batch_tokens, self.shards, self.pack_length)
        out, norms = np.zeros((len(ids), width), np.float32), np.zeros((len(ids),), np.float32)
        pending = None  # (rows, outputs) of the batch on the device while the next one is packed and sent
        with tqdm(total=len(ids), desc="encoding", unit="text", disable=not progress) as bar:
            for rows, length, padded_rows in [*plan, (None, None, None)]:
                dispatched = None
                if rows:
                    batch = pack_batch(ids, embed_lengths, rows, length, padded_rows)
                    packed = length <= self.pack_length  # the program pools each text of a row apart
                    dispatched = (rows, self._dispatch(batch, row_capacity(length) if packed else 1))
                if pending is not None:
                    done, outputs = pending
                    vectors, lengths = self._fetch(outputs)
                    for row, indices in enumerate(done):
                        packed_row = vectors.ndim == 3
                        out[indices] = vectors[row, : len(indices)] if packed_row else vectors[row]
                        norms[indices] = lengths[row, : len(indices)] if packed_row else lengths[row]
                    bar.update(sum(map(len, done)))
                pending = dispatched
        return out, norms
