"""ForwardOptions: how a forward pass runs (attention mode, kernel, remat, scanned layers), passed in with each call.

The same weights serve bidirectional and causal encoders, several attention kernels and the train
step's rematerialisation; these are settings of a call, not of the module, so they travel as one
frozen, hashable value (a static argument under jit) and are checked once, where they are made.
"""

from __future__ import annotations

import dataclasses

import jax

from diffemb_jax.errors import ConfigError
from diffemb_jax.model.attention import KERNELS

ATTENTION_MODES = ("bidirectional", "causal")
# What a block keeps for the backward pass: everything, nothing (recompute the block), the projections'
# outputs (dots), or those and attention's batched matmuls too (dots_all: scores [B, H, L, L] kept).
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  "dots_all": jax.checkpoint_policies.dots_saveable}


@dataclasses.dataclass(frozen=True)
class ForwardOptions:
    attention: str = "bidirectional"  # one of ATTENTION_MODES
    kernel: str = "xla"  # one of attention.KERNELS; auto picks by backend
    remat: str = "none"  # one of REMAT_POLICIES
    # The blocks as one lax.scan (model/scan.py): one block compiled instead of one per layer, at the cost
    # of a copy of the blocks' weights while the pass runs; the same numbers, parameters and their names.
    scan_layers: bool = False

    def __post_init__(self):
        if self.attention not in ATTENTION_MODES:
            raise ConfigError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.kernel not in KERNELS:
            raise ConfigError(f"unknown attention kernel {self.kernel!r}; choose one of {KERNELS}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")
        if not isinstance(self.scan_layers, bool):
            raise ConfigError(f"scan_layers must be True or False, got {self.scan_layers!r}")

    @property
    def causal(self) -> bool:
        return self.attention == "causal"
