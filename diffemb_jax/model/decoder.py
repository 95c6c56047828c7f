"""One Flax NNX decoder for Dream, LLaDA, Qwen2, LLaMA and Mistral, bidirectional or causal.

Pre-norm blocks of RMSNorm, rotate-half RoPE attention with grouped-query heads and optional q/k/v
bias, and a SwiGLU MLP. Parameters carry logical axis names (vocab, embed, q_heads, kv_heads, mlp,
norm) that parallel rules map onto a mesh. Positions count from each sequence's first real token, so
left and right padding give the same hidden states on the real tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffemb_jax.model.attention import attend
from diffemb_jax.model.config import ModelConfig

ATTENTION_MODES = ("bidirectional", "causal")
# What a block keeps for the backward pass: everything, nothing (recompute the block), the projections'
# outputs (dots), or those and attention's batched matmuls too (dots_all: scores [B, H, L, L] kept).
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  "dots_all": jax.checkpoint_policies.dots_saveable}
_normal = nnx.initializers.normal(0.02)


def _linear(n_in, n_out, axes, *, bias, dtype, param_dtype, rngs):
    return nnx.Linear(
        n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(_normal, axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), axes[1:]), rngs=rngs)


class RMSNorm(nnx.Module):
    """Normalise in float32, cast back, then scale: the order transformers uses."""

    def __init__(self, dim: int, eps: float, *, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), sharding=("norm",))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate-half rotary embedding of x [B, L, H, D] at integer positions [B, L]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half1, half2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-half2, half1], axis=-1) * sin


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg = cfg
        self.q_proj = _linear(d, cfg.num_heads * hd, ("embed", "q_heads"), bias=cfg.qkv_bias, **kw)
        self.k_proj = _linear(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
        self.v_proj = _linear(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
        self.o_proj = _linear(cfg.num_heads * hd, d, ("q_heads", "embed"), bias=False, **kw)

    def __call__(self, x, positions, padding_mask, *, causal: bool, kernel: str, packed: bool):
        b, l, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).reshape(b, l, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, l, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, l, cfg.num_kv_heads, cfg.head_dim)
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        out = attend(q, k, v, padding_mask, causal=causal, sliding_window=cfg.sliding_window, kernel=kernel,
                     packed=packed)
        return self.o_proj(out.reshape(b, l, cfg.num_heads * cfg.head_dim))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = _linear(d, f, ("embed", "mlp"), **kw)
        self.up_proj = _linear(d, f, ("embed", "mlp"), **kw)
        self.down_proj = _linear(f, d, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, positions, padding_mask, *, causal: bool, kernel: str, packed: bool):
        x = x + self.attn(self.input_norm(x), positions, padding_mask, causal=causal, kernel=kernel, packed=packed)
        return x + self.mlp(self.post_attention_norm(x))


def positions_from_mask(padding_mask: jax.Array) -> jax.Array:
    """0, 1, 2... from each row's first real token (pads get 0; they are masked anyway)."""
    return jnp.maximum(jnp.cumsum(padding_mask.astype(jnp.int32), axis=-1) - 1, 0)


def _rematerialised(run, block, x, policy):
    """run(block, x) under jax.checkpoint, on the block's state as a plain pytree (so it composes
    with jax.grad outside NNX transforms); RNG counts advanced inside (dropout) are kept."""
    graphdef, state = nnx.split(block)

    def pure(state, x):
        inner = nnx.merge(graphdef, state)
        return run(inner, x), nnx.state(inner, nnx.RngState)

    y, new_state = jax.checkpoint(pure, policy=policy)(state, x)
    nnx.update(block, new_state)
    return y


class Decoder(nnx.Module):
    """Token ids + padding mask -> final-norm hidden states; `logits` adds the LM head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention: str = "bidirectional", kernel: str = "xla", remat: str = "none"):
        self.cfg = cfg
        self.dtype = dtype
        self.attention = attention
        self.kernel = kernel
        self.remat = remat
        # Logical axis names are metadata only: placement on a mesh is the loader's job.
        with nnx.use_eager_sharding(False):
            self._build(cfg, rngs, dtype, param_dtype)

    def _build(self, cfg, rngs, dtype, param_dtype):
        self.embed = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=nnx.with_partitioning(_normal, ("vocab", "embed")), rngs=rngs)
        self.layers = nnx.List(
            [Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False,
                                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, padding_mask: jax.Array, packed: bool = False) -> jax.Array:
        """padding_mask: 1 for tokens, 0 for pads; or, `packed`, rows holding several texts one after
        another, each token's text number (1, 2, ...; 0 for pads): each text then attends within
        itself. Positions run on across a row: RoPE's scores depend on position differences only, so
        a text's states are those it has alone."""
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")
        causal = self.attention == "causal"
        positions = positions_from_mask(padding_mask > 0)

        def run(block, x):
            return block(x, positions, padding_mask, causal=causal, kernel=self.kernel, packed=packed)

        x = self.embed(input_ids)
        for block in self.layers:
            x = run(block, x) if self.remat == "none" else _rematerialised(run, block, x, REMAT_POLICIES[self.remat])
        return self.final_norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.cfg.tie_word_embeddings:
            return self.embed.attend(hidden)
        return self.lm_head(hidden)
