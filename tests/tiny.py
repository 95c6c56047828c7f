"""Tiny random checkpoints of every family, written to disk the way their owners write them.

qwen2, qwen3, llama and mistral are saved by transformers itself (qwen3 with head_dim 16, decoupled
from hidden / heads = 8, as Qwen3's own configs do). Dream and LLaDA run remote code we never
execute, so they are written as safetensors under their own tensor names with configs of their own
shape; their oracles are transformers' Qwen2 and LLaMA holding the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FAMILIES = ("qwen2", "qwen3", "Dream", "llama", "llada", "mistral")
TRANSFORMERS_FAMILIES = ("qwen2", "qwen3", "llama", "mistral")  # read and written by transformers itself
BARE_CLASSES = {"qwen2": "Qwen2Model", "qwen3": "Qwen3Model", "llama": "LlamaModel", "mistral": "MistralModel"}

_COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=256,
               initializer_range=0.2)


def oracle_model(family: str, seed: int = 0, **overrides):
    """The transformers model whose numbers the family must reproduce (float32, eval mode)."""
    import transformers as tf

    torch.manual_seed(seed)
    kw = {**_COMMON, **overrides}
    if family in ("qwen2", "Dream"):
        cfg = tf.Qwen2Config(rope_theta=1e6, tie_word_embeddings=False, **kw)
        model = tf.Qwen2ForCausalLM(cfg)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(rope_theta=1e6, tie_word_embeddings=False, head_dim=16, **kw)
        model = tf.Qwen3ForCausalLM(cfg)
    elif family in ("llama", "llada"):
        cfg = tf.LlamaConfig(rope_theta=5e5, tie_word_embeddings=(family == "llama"), **kw)
        model = tf.LlamaForCausalLM(cfg)
    elif family == "mistral":
        cfg = tf.MistralConfig(rope_theta=1e4, sliding_window=kw.pop("sliding_window", None), **kw)
        model = tf.MistralForCausalLM(cfg)
    else:
        raise ValueError(family)
    with torch.no_grad():  # norms start at 1; make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    return model.eval()


_LLADA_NAMES = {
    "model.embed_tokens.weight": "model.transformer.wte.weight",
    "model.norm.weight": "model.transformer.ln_f.weight",
    "lm_head.weight": "model.transformer.ff_out.weight",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm",
    "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
    "self_attn.o_proj": "attn_out", "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj",
    "mlp.down_proj": "ff_out",
}


def _llada_name(name: str) -> str:
    if name in _LLADA_NAMES:
        return _LLADA_NAMES[name]
    _, _, i, rest = name.split(".", 3)
    module, leaf = rest.rsplit(".", 1)
    return f"model.transformer.blocks.{i}.{_LLADA_NAMES[module]}.{leaf}"


WORDS = ("the a an is are was of to in on at for with by from and or not this that it he she they we you "
         "cat dog man woman child car house tree music guitar market stock bread query document text "
         "model diffusion embedding retrieval plays sings fell rose bakes reads writes runs big small "
         "red green blue fast slow happy sad one two three four five six seven").split()


def write_tokenizer(directory: Path, bos: bool = True) -> Path:
    """A word-level tokenizer.json over WORDS (ids < 97), adding <s> in front when `bos`."""
    import tokenizers
    from tokenizers import models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    assert len(vocab) <= _COMMON["vocab_size"]
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


def write_checkpoint(family: str, directory: Path, model=None, **overrides) -> Path:
    """Write a tiny checkpoint of `family` (weights, config, tokenizer) into `directory`; returns it."""
    from safetensors.torch import save_file

    model = model if model is not None else oracle_model(family, **overrides)
    directory.mkdir(parents=True, exist_ok=True)
    write_tokenizer(directory, bos=family in ("llama", "llada"))
    if family in TRANSFORMERS_FAMILIES:
        model.save_pretrained(directory)
        return directory
    hf = model.config
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if family == "Dream":
        config = hf.to_dict() | {"model_type": "Dream", "architectures": ["DreamModel"], "mask_token_id": 96,
                                 "auto_map": {"AutoModel": "modeling_dream.DreamModel"}}
        config.pop("transformers_version", None)
    else:
        state = {_llada_name(k): v for k, v in state.items()}
        config = {"model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": hf.hidden_size,
                  "n_layers": hf.num_hidden_layers, "n_heads": hf.num_attention_heads,
                  "n_kv_heads": hf.num_key_value_heads, "mlp_hidden_size": hf.intermediate_size,
                  "vocab_size": hf.vocab_size, "embedding_size": hf.vocab_size, "max_sequence_length": 256,
                  "rms_norm_eps": hf.rms_norm_eps, "rope_theta": 5e5, "mask_token_id": 96, "eos_token_id": 95,
                  "weight_tying": False, "include_bias": False, "include_qkv_bias": False,
                  "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms",
                  "rope_full_precision": True}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def oracle_hidden(model, input_ids, padding_mask, attention: str):
    """transformers' final hidden states; bidirectional through an explicit 4-D boolean mask."""
    ids = torch.as_tensor(input_ids)
    pad = torch.as_tensor(padding_mask).bool()
    positions = (pad.long().cumsum(-1) - 1).clamp(min=0)
    if attention == "bidirectional":
        mask = pad[:, None, None, :].expand(-1, 1, ids.shape[1], -1)
    else:
        mask = pad.long()  # transformers builds its own causal (and sliding-window) mask
    with torch.no_grad():
        out = model.model(input_ids=ids, attention_mask=mask, position_ids=positions)
    return out.last_hidden_state.numpy()


def oracle_mean_vectors(model, tokenizer_dir: Path, texts, attention: str):
    """Each text alone through `model` (transformers), its final hidden states mean-pooled and
    L2-normalised: what diffemb's mean-pooled encode must give."""
    import numpy as np
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    out = []
    for text in texts:
        ids = np.asarray([tok.encode(text).ids])
        hidden = oracle_hidden(model, ids, np.ones_like(ids), attention)[0].mean(0)
        out.append(hidden / np.linalg.norm(hidden))
    return np.stack(out)
