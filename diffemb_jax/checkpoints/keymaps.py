"""Checkpoint tensor names <-> decoder parameter paths, by the rows of a family (families.py).

Each row pairs an HF name pattern with an NNX path pattern (`{i}` is the layer index). The table
reads both ways, so export (the way out) inverts the same rows. `kernel` leaves are stored
transposed in HF ([out, in]) and are transposed on the way through.

Two layouts of the same names: `prefixed`, as the LM class writes them (`model.layers.0...`,
`lm_head.weight`), and bare, as the bare decoder (AutoModel: Qwen2Model, LlamaModel...) writes them,
the family's `bare_prefix` dropped (`layers.0...`). Which one a checkpoint uses is read from its
tensor names (`layout_of`), never from its folder; whether it holds an untied head, likewise
(`fit_to_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

from diffemb_jax.checkpoints.families import FAMILIES
from diffemb_jax.model import ModelConfig

# Buffers some checkpoints carry that are not parameters (recomputed from the config).
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
HEAD = ("lm_head", "kernel")


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


class KeyMap:
    """Translate names for one family and layout, both directions."""

    def __init__(self, model_type: str, tied_head: bool, *, prefixed: bool = True):
        family = FAMILIES[model_type]
        rows = family.names if prefixed else [(hf.removeprefix(family.bare_prefix), path) for hf, path in family.names]
        self._forward = [(_compile(hf), nnx_path) for hf, nnx_path in rows]
        self._backward = [(_compile(nnx_path), hf) for hf, nnx_path in rows]
        self.tied_head = tied_head
        self.prefixed = prefixed

    def to_param_path(self, hf_name: str) -> tuple | None:
        """HF name -> NNX path tuple (layer indices as int), or None if no row matches."""
        for pattern, template in self._forward:
            m = pattern.match(hf_name)
            if m:
                dotted = template.replace("{i}", m.group("i")) if "i" in m.groupdict() else template
                return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))
        return None

    def to_hf_name(self, path: tuple) -> str:
        dotted = ".".join(str(p) for p in path)
        for pattern, template in self._backward:
            m = pattern.match(dotted)
            if m:
                return template.replace("{i}", m.group("i")) if "i" in m.groupdict() else template
        raise KeyError(f"no HF name for parameter {dotted}")

    def is_ignorable(self, hf_name: str) -> bool:
        """Tensors a faithful load may skip: RoPE buffers, and a tied head written out anyway."""
        if IGNORED.search(hf_name):
            return True
        return self.tied_head and self.to_param_path(hf_name) == HEAD


def layout_of(model_type: str, names: Iterable[str]) -> bool:
    """Whether a checkpoint's tensor names are prefixed (the LM class's) rather than bare (the bare
    decoder's): the layout under which more of them have a parameter; prefixed on a tie, so a
    checkpoint that fits neither is reported against the family's own names."""
    names = list(names)
    hits = {prefixed: sum(KeyMap(model_type, False, prefixed=prefixed).to_param_path(n) is not None for n in names)
            for prefixed in (True, False)}
    return hits[True] >= hits[False]


def keymap_for(cfg: ModelConfig, names: Iterable[str]) -> KeyMap:
    """The key map of `cfg`'s family in the layout the checkpoint's names use."""
    return KeyMap(cfg.model_type, cfg.tie_word_embeddings, prefixed=layout_of(cfg.model_type, names))


def fit_to_checkpoint(cfg: ModelConfig, names: Iterable[str]) -> ModelConfig:
    """`cfg` as the checkpoint holds it: `lm_head=False` when the head is untied and no tensor of the
    checkpoint is the head (a bare decoder saved with save_pretrained); otherwise `cfg` unchanged."""
    names = list(names)
    if cfg.tie_word_embeddings or not cfg.lm_head:
        return cfg
    keymap = keymap_for(cfg, names)
    if any(keymap.to_param_path(n) == HEAD for n in names):
        return cfg
    return dataclasses.replace(cfg, lm_head=False)


def is_transposed(path: tuple) -> bool:
    return path[-1] == "kernel"
