"""Adaptation to bidirectional attention: --config=configs/adapt.py[:OBJECTIVE[,SIZE]]

OBJECTIVE: diffusion (masked diffusion, full-parameter, as Dream adapts Qwen2.5) | mntp (llm2vec's
  masked next-token prediction with LoRA r=16: the reference's train_configs/mntp/Qwen2.json, 512
  tokens, masking 0.2, 4000 steps, per-device batch 16, lr the HF default 5e-5)
SIZE: full (default) | small (a 135M model on a CPU in minutes) | tiny (tests)
Set --config.model.path and --config.data.files.
"""

from diffemb_jax.errors import ConfigError
from diffemb_jax.training.config import adapt_config

SIZES = {
    "full": dict(steps=None, global_batch_size=None, length=None),
    "small": dict(steps=200, global_batch_size=8, length=128),
    "tiny": dict(steps=4, global_batch_size=4, length=32),
}


def get_config(arg: str = "diffusion"):
    objective, _, size = arg.partition(",")
    size = size or "full"
    if objective not in ("diffusion", "mntp") or size not in SIZES:
        raise ConfigError(f"--config=configs/adapt.py:OBJECTIVE[,SIZE] with OBJECTIVE diffusion | mntp and SIZE in "
                         f"{tuple(SIZES)}; got {arg!r}")
    c = adapt_config()
    c.objective.kind = objective
    if objective == "mntp":
        c.lora.update(rank=16, alpha=32.0, dropout=0.05)
        c.data.length = 512
        c.train.update(steps=4000, global_batch_size=16, lr=5e-5, warmup_steps=0)
    s = SIZES[size]
    if s["steps"]:
        c.data.length = s["length"]
        c.train.update(steps=s["steps"], global_batch_size=s["global_batch_size"], lr=1e-4 if size == "small" else 1e-3,
                       warmup_steps=min(c.train.warmup_steps, s["steps"] // 10), remat="none",
                       checkpoint_every=max(s["steps"] // 4, 1))
    return c
