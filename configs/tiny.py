"""A few steps on a tiny model: for tests and smoke runs. Set --config.model.path and --config.data.files."""

from diffemb_jax.training.config import base_config


def get_config():
    c = base_config()
    c.model.dtype = "float32"
    c.lora.rank, c.lora.alpha, c.lora.dropout = 4, 8.0, 0.0
    c.data.query_max_length, c.data.doc_max_length = 16, 24
    c.train.update(steps=30, global_batch_size=8, lr=1e-3, warmup_steps=2, remat="none", checkpoint_every=2,
                   keep_checkpoints=2)
    return c
