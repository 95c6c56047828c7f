"""Checkpoint tensor names <-> decoder parameter paths, by the rows of a family (families.py).

Each row pairs an HF name pattern with an NNX path pattern (`{i}` is the layer index). The table
reads both ways, so export (the way out) inverts the same rows. `kernel` leaves are stored
transposed in HF ([out, in]) and are transposed on the way through.
"""

from __future__ import annotations

import re

from diffemb_jax.checkpoints.families import FAMILIES

# Buffers some checkpoints carry that are not parameters (recomputed from the config).
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


class KeyMap:
    """Translate names for one family, both directions."""

    def __init__(self, model_type: str, tied_head: bool):
        rows = FAMILIES[model_type].names
        self._forward = [(_compile(hf), nnx_path) for hf, nnx_path in rows]
        self._backward = [(_compile(nnx_path), hf) for hf, nnx_path in rows]
        self.tied_head = tied_head

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
        return self.tied_head and self.to_param_path(hf_name) == ("lm_head", "kernel")


def is_transposed(path: tuple) -> bool:
    return path[-1] == "kernel"
