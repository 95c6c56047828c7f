"""Attention kernels: Pallas splash attention (interpret mode on CPU) equals the XLA path on the
decoder, both modes, both padding sides; `auto` picks by backend and falls back with a reason."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import padded_batch

import tiny
from conversion import load_model
from diffemb_jax.model.attention import attend, resolve_kernel


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(tiny.write_checkpoint("qwen2", tmp_path_factory.mktemp("qwen2") / "hf"), progress=False)[0]


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_splash_equals_xla_on_the_decoder(model, attention, side):
    ids, mask = padded_batch([9, 5, 2], 9, side)
    model.attention = attention
    out = {}
    for kernel in ("xla", "splash"):
        model.kernel = kernel
        out[kernel] = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    model.kernel = "xla"
    real = mask.astype(bool)
    np.testing.assert_allclose(out["splash"][real], out["xla"][real], atol=1e-5)


def test_splash_gradients_equal_xla():
    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.randn(2, 20, 4, 8), jnp.float32)
    k, v = (jnp.asarray(rng.randn(2, 20, 2, 8), jnp.float32) for _ in range(2))
    _, mask = padded_batch([20, 13], 20, "right")

    def loss(q, kernel):  # over real query positions: what pads attend to differs by kernel and is unused
        out = attend(q, k, v, jnp.asarray(mask), causal=False, kernel=kernel)
        return ((out ** 2).sum(axis=(2, 3)) * mask).sum()

    np.testing.assert_allclose(jax.grad(loss)(q, "splash"), jax.grad(loss)(q, "xla"), atol=1e-4)


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
