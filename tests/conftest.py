import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# On a GPU, JAX in this process would otherwise take 75% of the memory up front, and the bench
# workers (child processes, test_bench.py) would then find too little to start on the GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The CLI keeps compiled programs in a persistent cache under ~/.cache; tests stay out of it (and
# out of each other's way) unless they turn it on for themselves (test_cli.py).
os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def padded_batch(lengths, length, side, seed=0, vocab=97):
    """Random ids [B, length] with a 0/1 mask padded on `side`."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, vocab, (len(lengths), length)).astype(np.int32)
    mask = np.zeros((len(lengths), length), np.int32)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, length - n:] = 1
    return ids, mask


@pytest.fixture(scope="session")
def smollm2_converted(tmp_path_factory):
    """The real SmolLM2-135M converted once per test session."""
    from diffemb_jax.checkpoints import convert
    from diffemb_jax import assets

    return convert(assets.smollm2_gguf(), tmp_path_factory.mktemp("smollm2") / "converted", progress=False)
