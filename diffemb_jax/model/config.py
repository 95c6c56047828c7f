"""ModelConfig: the shape of a decoder, one type for all families.

Family differences live here as values (q/k/v bias, q/k norms, grouped-query heads, head_dim, rope
theta, tied or missing head),
never as branches in the layers. Reading it from a checkpoint's config.json is the checkpoints'
business (checkpoints/families.py): the model knows nothing of Hugging Face.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from diffemb_jax.errors import UserError


class UnsupportedConfigError(UserError):
    """A config.json the decoder cannot reproduce faithfully."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str  # the checkpoint family (checkpoints/families.py): key map, config.json layout
    vocab_size: int  # rows of the embedding table
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on each head of q and k, after projection, before RoPE (Qwen3)
    tie_word_embeddings: bool = False
    # The untied LM head is present. False: a bare decoder (e.g. a Qwen2Model saved with save_pretrained)
    # whose checkpoint holds no head: none is built, `Decoder.logits` raises; encoding needs none.
    lm_head: bool = True
    sliding_window: int | None = None  # causal mode only, as in transformers' Mistral
    max_position_embeddings: int = 32768
    mask_token_id: int | None = None  # diffusion LMs (Dream, LLaDA)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.tie_word_embeddings and not self.lm_head:
            raise UnsupportedConfigError(
                "lm_head=False is for an untied head a checkpoint lacks; a tied head is the embedding matrix")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        data = json.loads(Path(path).read_text())
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise UnsupportedConfigError(f"{path}: unknown ModelConfig keys {unknown}")
        return cls(**data)
