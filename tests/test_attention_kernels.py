"""Attention kernels: Pallas splash attention (interpret mode on CPU) equals the XLA path on the
decoder, both modes, both padding sides; the XLA path's query chunks equal its one pass and bound
its memory; `auto` picks by backend and falls back with a reason. (The chunks against transformers:
test_model_parity.)"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import padded_batch

import tiny
from diffemb_jax.checkpoints import load_model
from diffemb_jax.model import ForwardOptions
from diffemb_jax.model import attention as kernels
from diffemb_jax.model.attention import attend, resolve_kernel


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(tiny.write_checkpoint("qwen2", tmp_path_factory.mktemp("qwen2") / "hf"), progress=False)[0]


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_splash_equals_xla_on_the_decoder(model, attention, side):
    ids, mask = padded_batch([9, 5, 2], 9, side)
    out = {}
    for kernel in ("xla", "splash"):
        options = ForwardOptions(attention=attention, kernel=kernel)
        out[kernel] = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), options))
    real = mask.astype(bool)
    np.testing.assert_allclose(out["splash"][real], out["xla"][real], atol=1e-5)


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_packed_rows_equal_one_text_a_row(model, attention):
    """Texts packed into a row (segments 1, 2, ...; pads 0) give each text the hidden states it has
    alone in a row, with the xla kernel and with splash (which takes the segments as they are)."""
    ids, mask = padded_batch([5, 3, 6], 6, "right")
    rows = [[0, 1], [2]]  # texts 0 and 1 share a row of 9 tokens, text 2 has one alone
    packed_ids, segments = np.zeros((2, 9), np.int32), np.zeros((2, 9), np.int32)
    for r, texts in enumerate(rows):
        start = 0
        for k, i in enumerate(texts, 1):
            n = int(mask[i].sum())
            packed_ids[r, start:start + n], segments[r, start:start + n] = ids[i, :n], k
            start += n
    alone = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), ForwardOptions(attention=attention)))
    for kernel in ("xla", "splash"):
        options = ForwardOptions(attention=attention, kernel=kernel)
        out = np.asarray(model(jnp.asarray(packed_ids), jnp.asarray(segments), options, texts_per_row=2))
        np.testing.assert_allclose(out[0, :5], alone[0, :5], atol=1e-5)
        np.testing.assert_allclose(out[0, 5:8], alone[1, :3], atol=1e-5)
        np.testing.assert_allclose(out[1, :6], alone[2, :6], atol=1e-5)


def test_splash_gradients_equal_xla():
    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.randn(2, 20, 4, 8), jnp.float32)
    k, v = (jnp.asarray(rng.randn(2, 20, 2, 8), jnp.float32) for _ in range(2))
    _, mask = padded_batch([20, 13], 20, "right")

    def loss(q, kernel):  # over real query positions: what pads attend to differs by kernel and is unused
        out = attend(q, k, v, jnp.asarray(mask), causal=False, kernel=kernel)
        return ((out ** 2).sum(axis=(2, 3)) * mask).sum()

    np.testing.assert_allclose(jax.grad(loss)(q, "splash"), jax.grad(loss)(q, "xla"), atol=1e-4)


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 5)])
@pytest.mark.parametrize("side", ["right", "left"])
def test_query_chunks_equal_one_pass_with_gradients(causal, window, side):
    rng = np.random.RandomState(1)
    q = jnp.asarray(rng.randn(2, 23, 4, 8), jnp.float32)
    k, v = (jnp.asarray(rng.randn(2, 23, 2, 8), jnp.float32) for _ in range(2))
    mask = jnp.asarray(padded_batch([23, 14], 23, side)[1])

    def loss(q, k, v, chunk):  # over real queries: fully masked pad rows are unused
        out = kernels._xla(q, k, v, mask, causal, window, chunk)
        return ((out ** 2).sum(axis=(2, 3)) * mask).sum()

    one_pass = loss(q, k, v, 23), jax.grad(loss, argnums=(0, 1, 2))(q, k, v, 23)
    chunked = loss(q, k, v, 8), jax.grad(loss, argnums=(0, 1, 2))(q, k, v, 8)  # 8 + 8 + 7 queries
    np.testing.assert_allclose(chunked[0], one_pass[0], rtol=1e-5)
    for a, b in zip(chunked[1], one_pass[1]):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_query_chunks_bound_memory():
    """XLA's own account of the compiled programs at 8192 tokens: one pass holds at least the
    [H, L, L] scores (512 MiB here); chunks of 1024 queries hold less, and under a quarter of what
    one pass holds, forward and backward."""
    length, heads = 8192, 2
    q = jax.ShapeDtypeStruct((1, length, heads, 8), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, length, 1, 8), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, length), jnp.int32)
    scores = heads * length * length * 4

    def temp_bytes(chunk, backward):
        fn = lambda q, k, v, m: kernels._xla(q, k, v, m, False, None, chunk)  # noqa: E731
        if backward:
            fn = jax.grad(lambda *a, f=fn: f(*a).sum(), argnums=(0, 1, 2))
        return jax.jit(fn).lower(q, kv, kv, mask).compile().memory_analysis().temp_size_in_bytes

    for backward in (False, True):
        one_pass, chunked = temp_bytes(length, backward), temp_bytes(1024, backward)
        assert one_pass >= scores
        assert chunked < min(scores, one_pass / 4)


def test_auto_picks_by_backend_and_explains_fallbacks(caplog):
    resolve_kernel.cache_clear()
    assert resolve_kernel("auto", "cpu", "float32", 64, None) == "xla"
    assert resolve_kernel("auto", "gpu", "bfloat16", 128, None) == "cudnn"
    assert resolve_kernel("auto", "tpu", "bfloat16", 128, None) == "splash"
    with caplog.at_level(logging.WARNING):
        assert resolve_kernel("auto", "gpu", "float32", 64, None) == "xla"
        assert resolve_kernel("auto", "gpu", "bfloat16", 256, None) == "xla"
        assert resolve_kernel("auto", "tpu", "bfloat16", 128, 4096) == "xla"
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        "attention: cudnn needs bfloat16/float16 (got float32)",
        "attention: cudnn needs head_dim <= 128 and a multiple of 8 (got 256)",
        "attention: the splash path here has no sliding window"]
    with pytest.raises(ValueError, match="choose one of"):
        resolve_kernel("flash", "cpu", "float32", 64, None)


def test_cudnn_on_cpu_is_a_clear_error():
    x = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        attend(x, x, x, jnp.ones((1, 4), jnp.int32), causal=False, kernel="cudnn")


SHARDED_SPLASH = """
import jax, jax.numpy as jnp, numpy as np, sys
sys.path.insert(0, "tests")
from conftest import padded_batch
from diffemb_jax import parallel
from diffemb_jax.model.attention import attend
rng = np.random.RandomState(0)
q = jnp.asarray(rng.randn(4, 20, 4, 8), jnp.float32)
k, v = (jnp.asarray(rng.randn(4, 20, 2, 8), jnp.float32) for _ in range(2))
_, mask = padded_batch([20, 13, 7, 1], 20, "left")
want = attend(q, k, v, jnp.asarray(mask), causal=True, kernel="xla")
mesh = parallel.make_mesh(2, 2, 2)
with jax.set_mesh(mesh):
    placed = jax.device_put((q, k, v), jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"), None, "tensor")))
    got = jax.jit(lambda q, k, v, m: attend(q, k, v, m, causal=True, kernel="splash"))(*placed, jnp.asarray(mask))
real = mask.astype(bool)
np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)
print("OK")
"""


def test_splash_inside_shard_map_on_a_mesh():
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "PYTEST"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run([sys.executable, "-c", SHARDED_SPLASH], capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).parent.parent, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")
