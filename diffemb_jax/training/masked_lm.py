"""The adaptation objectives: masked tokens predicted with bidirectional attention, one position early.

Both start from an autoregressive LM and keep its head's habit of predicting the next token: the
logits at position i score token i + 1 (Dream's shift; llm2vec's MNTP does the same), so a masked
token at i is predicted from position i - 1, and the first token of a text (segment) is never masked.

- "diffusion" (masked diffusion, as LLaDA and Dream train): each row draws t ~ U(0, 1), masks each
  token with probability p = (1 - eps) t + eps, and the cross-entropy of every masked token is
  weighted 1 / p; the sum is divided by the tokens that could be predicted (LLaDA divides by
  batch x length: the same for rows of one text without pads). This is the ELBO of the masked-diffusion LM.
- "mntp" (llm2vec): a fixed `ratio` (0.2) of tokens chosen, of those 80% replaced by the mask token,
  10% by a random token, 10% left (transformers' DataCollatorForLanguageModeling, which llm2vec's
  MNTP uses); the mean cross-entropy over the chosen tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffemb_jax.errors import ConfigError

OBJECTIVES = ("diffusion", "mntp")


def predictable(segments: jax.Array) -> jax.Array:
    """[B, L] bool: tokens with a token of their own text just before them (segment ids, 0: pad)."""
    before = jnp.pad(segments[:, :-1], ((0, 0), (1, 0)))
    return (segments > 0) & (segments == before)


def corrupt(key: jax.Array, ids: jax.Array, segments: jax.Array, *, objective: str, mask_id: int, vocab: int,
            eps: float = 1e-3, ratio: float = 0.2) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(noisy ids, masked [B, L] bool, weight [B]): the input with tokens masked, which to predict,
    and each row's loss weight. Only predictable tokens are masked (never pads or a text's first)."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    b, l = ids.shape
    k_t, k_mask, k_kind, k_random = jax.random.split(key, 4)
    can = predictable(segments)
    if objective == "diffusion":
        p = (1 - eps) * jax.random.uniform(k_t, (b,)) + eps
        masked = (jax.random.uniform(k_mask, (b, l)) < p[:, None]) & can
        return jnp.where(masked, mask_id, ids), masked, 1.0 / p
    masked = (jax.random.uniform(k_mask, (b, l)) < ratio) & can
    kind = jax.random.uniform(k_kind, (b, l))
    random_ids = jax.random.randint(k_random, (b, l), 0, vocab, dtype=ids.dtype)
    noisy = jnp.where(masked & (kind < 0.8), mask_id, jnp.where(masked & (kind >= 0.9), random_ids, ids))
    return noisy, masked, jnp.ones((b,), jnp.float32)


def masked_lm_loss(logits: jax.Array, ids: jax.Array, masked: jax.Array, weight: jax.Array,
                   segments: jax.Array, *, objective: str) -> dict[str, jax.Array]:
    """'loss' (the objective's), 'masked_ce' (the plain mean cross-entropy of masked tokens) and
    'accuracy' (of masked tokens), from logits [B, L, V] at the noisy input; position i - 1 predicts i."""
    pred = logits[:, :-1].astype(jnp.float32)
    target, chosen = ids[:, 1:], masked[:, 1:].astype(jnp.float32)
    ce = jax.nn.logsumexp(pred, axis=-1) - jnp.take_along_axis(pred, target[..., None], axis=-1)[..., 0]
    n_masked = jnp.maximum(chosen.sum(), 1.0)
    masked_ce = (ce * chosen).sum() / n_masked
    if objective == "diffusion":
        tokens = jnp.maximum(predictable(segments).astype(jnp.float32).sum(), 1.0)
        loss = (ce * chosen * weight[:, None]).sum() / tokens
    else:
        loss = masked_ce
    accuracy = ((jnp.argmax(pred, axis=-1) == target) * chosen).sum() / n_masked
    return {"loss": loss, "masked_ce": masked_ce, "accuracy": accuracy, "masked": chosen.sum()}
