"""One Flax NNX decoder for Dream, LLaDA, Qwen2, Qwen3, LLaMA and Mistral, bidirectional or causal.

Pre-norm blocks of RMSNorm, rotate-half RoPE attention with grouped-query heads, optional q/k/v
bias and optional per-head q/k RMSNorm (cfg.qk_norm), and a SwiGLU MLP. Parameters carry logical axis names (vocab, embed, q_heads, kv_heads, mlp,
norm) that parallel rules map onto a mesh. Positions count from each sequence's first real token, so
left and right padding give the same hidden states on the real tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffemb_jax.errors import UserError
from diffemb_jax.model.attention import attend
from diffemb_jax.model.config import ModelConfig
from diffemb_jax.model.lora_linear import LoraLinear
from diffemb_jax.model.options import REMAT_POLICIES, ForwardOptions
from diffemb_jax.model.scan import scan_blocks

# A block's projections, in the order its forward pass runs them (LoRA numbers its dropout draws so).
BLOCK_PROJECTIONS = ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj",
                     "mlp/down_proj")
_normal = nnx.initializers.normal(0.02)


def _linear(n_in, n_out, axes, *, bias, dtype, param_dtype, rngs):
    return nnx.Linear(
        n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(_normal, axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), axes[1:]), rngs=rngs)


def _project(layer, x, dropout_key, draw_offset=None):
    """A projection, plain or adapted (a LoraLinear draws its dropout from dropout_key, at its draw index
    plus draw_offset when the blocks are scanned)."""
    return layer(x, dropout_key, draw_offset) if isinstance(layer, LoraLinear) else layer(x)


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
        if cfg.qk_norm:  # one scale over head_dim, shared by every head
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=param_dtype)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, x, positions, segment_ids, options: ForwardOptions, texts_per_row: int, dropout_key=None,
                 draw_offset=None):
        b, l, _ = x.shape
        cfg = self.cfg
        q = _project(self.q_proj, x, dropout_key, draw_offset).reshape(b, l, cfg.num_heads, cfg.head_dim)
        k = _project(self.k_proj, x, dropout_key, draw_offset).reshape(b, l, cfg.num_kv_heads, cfg.head_dim)
        v = _project(self.v_proj, x, dropout_key, draw_offset).reshape(b, l, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        out = attend(q, k, v, segment_ids, causal=options.causal, sliding_window=cfg.sliding_window,
                     kernel=options.kernel, texts_per_row=texts_per_row)
        return _project(self.o_proj, out.reshape(b, l, cfg.num_heads * cfg.head_dim), dropout_key, draw_offset)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = _linear(d, f, ("embed", "mlp"), **kw)
        self.up_proj = _linear(d, f, ("embed", "mlp"), **kw)
        self.down_proj = _linear(f, d, ("mlp", "embed"), **kw)

    def __call__(self, x, dropout_key=None, draw_offset=None):
        gate = jax.nn.silu(_project(self.gate_proj, x, dropout_key, draw_offset))
        up = _project(self.up_proj, x, dropout_key, draw_offset)
        return _project(self.down_proj, gate * up, dropout_key, draw_offset)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, positions, segment_ids, options: ForwardOptions, texts_per_row: int, dropout_key=None,
                 draw_offset=None):
        x = x + self.attn(self.input_norm(x), positions, segment_ids, options, texts_per_row, dropout_key,
                          draw_offset)
        return x + self.mlp(self.post_attention_norm(x), dropout_key, draw_offset)


def positions_from_mask(real: jax.Array) -> jax.Array:
    """0, 1, 2... from each row's first real token (pads get 0; they are masked anyway)."""
    return jnp.maximum(jnp.cumsum(real.astype(jnp.int32), axis=-1) - 1, 0)


def _rematerialised(run, block, x, dropout_key, policy):
    """run(block, x, dropout_key) under jax.checkpoint, on the block's state as a plain pytree (so it
    composes with jax.grad outside NNX transforms)."""
    graphdef, state = nnx.split(block)

    def pure(state, x, dropout_key):
        return run(nnx.merge(graphdef, state), x, dropout_key)

    return jax.checkpoint(pure, policy=policy)(state, x, dropout_key)


class Decoder(nnx.Module):
    """Token ids + segment ids -> final-norm hidden states; `logits` adds the LM head. How the pass
    runs (attention mode, kernel, remat, scanned layers) is a ForwardOptions given with each call. An untied head
exists only when cfg.lm_head (a bare checkpoint has none)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.cfg = cfg
        self.dtype = dtype
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
        if not cfg.tie_word_embeddings and cfg.lm_head:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False,
                                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, segment_ids: jax.Array, options: ForwardOptions = ForwardOptions(),
                 *, texts_per_row: int = 1, dropout_key: jax.Array | None = None) -> jax.Array:
        """segment_ids: each token's text number, 0 for pads: 1 for every real token of a row holding one
        text, or, with `texts_per_row` (the most a row holds) above 1, distinct numbers for the texts a
        row holds one after another from its start (pads after them), each then attending within itself. Positions run on across a row: RoPE's scores depend on position differences
        only, so a text's states are those it has alone. `dropout_key`: the LoRA adapters' dropout
        masks are drawn from it (none without it)."""
        positions = positions_from_mask(segment_ids > 0)

        def run(block, x, dropout_key, draw_offset=None):
            return block(x, positions, segment_ids, options, texts_per_row, dropout_key, draw_offset)

        policy = REMAT_POLICIES[options.remat]
        x = self.embed(input_ids)
        if options.scan_layers:
            x = scan_blocks(self.layers, x, lambda block, x, offset: run(block, x, dropout_key, offset), policy,
                            remat=options.remat != "none")
            return self.final_norm(x)
        for block in self.layers:
            if options.remat == "none":
                x = run(block, x, dropout_key)
            else:
                x = _rematerialised(run, block, x, dropout_key, policy)
        return self.final_norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.cfg.tie_word_embeddings:
            return self.embed.attend(hidden)
        if not self.cfg.lm_head:
            raise UserError(
                f"this {self.cfg.model_type} decoder has no LM head: its checkpoint is a bare decoder (the "
                "AutoModel layout, no lm_head.weight). Encoding needs none; logits (diffemb adapt) do: load "
                "the checkpoint that carries the head (the ForCausalLM one)")
        return self.lm_head(hidden)
