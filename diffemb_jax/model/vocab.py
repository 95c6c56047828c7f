"""Growing the vocabulary: rows added to the embedding (and an untied head) for a new token.

A masked-diffusion or MNTP adaptation needs a mask token the autoregressive model never had. The new
rows start at the mean of the existing embedding rows (a neutral point the model's norms already
handle, as `resize_token_embeddings(mean_resizing=True)` does in transformers), head rows likewise.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from diffemb_jax.model.decoder import Decoder


def with_vocab_rows(model: Decoder, rows: int, **config_changes) -> Decoder:
    """A copy of `model` with `rows` embedding rows (at least as many as it has) and its config updated
    by `config_changes` (e.g. mask_token_id); the old rows keep their values."""
    cfg = model.cfg
    if rows < cfg.vocab_size:
        raise ValueError(f"the model has {cfg.vocab_size} embedding rows; cannot shrink to {rows}")
    new_cfg = dataclasses.replace(cfg, vocab_size=rows, **config_changes)
    values = nnx.state(model).to_pure_dict()
    extra = rows - cfg.vocab_size

    def grown(table, axis):
        mean = jnp.mean(table.astype(jnp.float32), axis=axis, keepdims=True).astype(table.dtype)
        return jnp.concatenate([table, jnp.repeat(mean, extra, axis=axis)], axis=axis)

    if extra:
        values["embed"]["embedding"] = grown(values["embed"]["embedding"], 0)
        if "lm_head" in values:
            values["lm_head"]["kernel"] = grown(values["lm_head"]["kernel"], 1)
    param_dtype = values["embed"]["embedding"].dtype
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: Decoder(new_cfg, rngs=nnx.Rngs(0), dtype=model.dtype, param_dtype=param_dtype)))
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)
