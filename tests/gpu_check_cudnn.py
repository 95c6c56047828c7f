"""On a GPU: cuDNN flash attention, every layout the kernel gives it, against the XLA kernel (README: GPU).

CI has no GPU, so this is a check to run where one is (not collected by pytest): random bfloat16 q, k,
v in rows packed with texts of random lengths (first fit decreasing, as the trainer packs), one text
a row, and both attention modes; the packed rows through cuDNN's packed layout (runs) and through the
mask (as an A100 takes them); outputs and q/k/v gradients on the real tokens against the XLA kernel in
float32. Prints each case's largest error and exits 1 if one is over the bfloat16 tolerance.

    PYTHONPATH=. python tests/gpu_check_cudnn.py
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from diffemb_jax.batching import pack_batch, pack_rows, texts_per_row
from diffemb_jax.model import attention

TOLERANCE = 2e-2  # bfloat16 against float32, scores of unit-variance q and k


def packed_rows(rng, length: int, texts: int):
    lengths = rng.integers(8, length // 2, size=texts).tolist()
    rows = pack_rows(lengths, length)
    ids = [[1] * n for n in lengths]
    _, segments, _ = pack_batch(ids, lengths, rows, length, len(rows))
    return segments


def case(segments, causal: bool, runs: bool, heads=(28, 4), dim=128, seed=0):
    b, length = segments.shape
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, length, heads[0], dim), jnp.float32)
    k, v = (jax.random.normal(key, (b, length, heads[1], dim), jnp.float32) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], q.shape, jnp.float32)
    segments = jnp.asarray(segments)
    real = (segments > 0)[..., None, None]
    bound = texts_per_row(np.asarray(segments)) if int(segments.max()) > 1 else 1
    attention.runs_cheaper = (lambda *_: True) if runs else (lambda *_: False)

    def run(kernel, dtype):
        def f(q, k, v):
            out = attention.attend(q.astype(dtype), k.astype(dtype), v.astype(dtype), segments, causal=causal,
                                   kernel=kernel, texts_per_row=bound)
            return (out.astype(jnp.float32) * cotangent * real).sum(), out

        (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return [np.asarray(x, np.float32) * np.asarray(real) for x in (out, *grads)]

    got, want = run("cudnn", jnp.bfloat16), run("xla", jnp.float32)
    return max(float(np.abs(a - b).max() / (np.abs(b).max() + 1e-6)) for a, b in zip(got, want))


def main() -> int:
    if jax.default_backend() != "gpu":
        print(f"needs a GPU; this backend is {jax.default_backend()!r}")
        return 2
    print(jax.devices()[0].device_kind, "jax", jax.__version__)
    rng = np.random.default_rng(0)
    layouts = {"packed 1024": packed_rows(rng, 1024, 24), "packed 4096": packed_rows(rng, 4096, 12),
               "one text a row": (np.arange(512)[None] < rng.integers(64, 512, size=(4, 1))).astype(np.int32)}
    worst = 0.0
    for name, segments in layouts.items():
        for causal in (False, True):
            for runs in ((True, False) if name.startswith("packed") else (False,)):
                error = case(segments, causal, runs)
                worst = max(worst, error)
                how = "runs" if runs else ("mask" if name.startswith("packed") else "lengths")
                print(f"{name:15} {'causal' if causal else 'bidirectional':13} {how:7} max relative error {error:.2e}")
    print("ok" if worst <= TOLERANCE else f"FAILED: {worst:.2e} > {TOLERANCE}")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
