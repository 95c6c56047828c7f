"""Every family against transformers (float32): hidden states within 1e-4 in both attention modes,
with right and left padding, in a batch of unequal lengths. Oracle: tests/tiny.py's transformers
models; bidirectional through an explicit 4-D boolean mask."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import padded_batch

import tiny
from diffemb_jax.checkpoints import load_model
from diffemb_jax.model import ForwardOptions

LENGTHS = [9, 5, 2]


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def family_pair(request, tmp_path_factory):
    family = request.param
    oracle = tiny.oracle_model(family)
    directory = tiny.write_checkpoint(family, tmp_path_factory.mktemp(family) / "hf", model=oracle)
    return family, oracle, directory


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_hidden_states_match_transformers(family_pair, side, attention):
    family, oracle, directory = family_pair
    model, _ = load_model(directory, progress=False)
    ids, mask = padded_batch(LENGTHS, 9, side)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), ForwardOptions(attention=attention)))
    theirs = tiny.oracle_hidden(oracle, ids, mask, attention)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_query_chunked_attention_matches_transformers(family_pair, attention, monkeypatch):
    """The xla kernel's long-sequence path (queries a chunk at a time), forced here at 4 tokens so
    that 9 tokens make three chunks, the last one short."""
    from diffemb_jax.model import attention as kernels

    family, oracle, directory = family_pair
    monkeypatch.setattr(kernels, "QUERY_CHUNK", 4)
    model, _ = load_model(directory, progress=False)
    ids, mask = padded_batch(LENGTHS, 9, "left")
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), ForwardOptions(attention=attention)))
    theirs = tiny.oracle_hidden(oracle, ids, mask, attention)
    np.testing.assert_allclose(ours[mask.astype(bool)], theirs[mask.astype(bool)], atol=1e-4, rtol=0)


def test_lm_head_logits_match_transformers(family_pair):
    """The head (tied for llama, its own matrix elsewhere) that diffusion and MNTP objectives need."""
    _, oracle, directory = family_pair
    model, _ = load_model(directory, progress=False)
    ids, mask = padded_batch(LENGTHS, 9, "right")
    ours = np.asarray(model.logits(model(jnp.asarray(ids), jnp.asarray(mask), ForwardOptions(attention="causal"))))
    with torch.no_grad():
        theirs = oracle(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    np.testing.assert_allclose(ours[mask.astype(bool)], theirs[mask.astype(bool)], atol=1e-4)


def test_modes_really_differ(family_pair):
    """Guards the test above: if the mask were ignored, both modes would agree."""
    _, _, directory = family_pair
    model, _ = load_model(directory, progress=False)
    ids, mask = padded_batch(LENGTHS, 9, "right")
    bi = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), ForwardOptions(attention="bidirectional")))
    causal = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), ForwardOptions(attention="causal")))
    assert np.abs(bi[0, :4] - causal[0, :4]).max() > 1e-2


def test_left_and_right_padding_agree_on_real_tokens(family_pair):
    _, _, directory = family_pair
    model, _ = load_model(directory, progress=False)
    ids, right = padded_batch(LENGTHS, 9, "right")
    left_ids = np.zeros_like(ids)
    _, left = padded_batch(LENGTHS, 9, "left")
    for i, n in enumerate(LENGTHS):
        left_ids[i, 9 - n:] = ids[i, :n]
    a = np.asarray(model(jnp.asarray(ids), jnp.asarray(right)))
    b = np.asarray(model(jnp.asarray(left_ids), jnp.asarray(left)))
    for i, n in enumerate(LENGTHS):
        np.testing.assert_allclose(a[i, :n], b[i, 9 - n:], atol=1e-5)


@pytest.mark.parametrize("query_chunk", [None, 4])
def test_mistral_sliding_window_matches_transformers(tmp_path, query_chunk, monkeypatch):
    """Causal mode with a window shorter than the sequence: transformers builds the window mask.
    Also with the xla kernel's query chunks, which must place the window by absolute position."""
    from diffemb_jax.model import attention as kernels

    if query_chunk:
        monkeypatch.setattr(kernels, "QUERY_CHUNK", query_chunk)
    oracle = tiny.oracle_model("mistral", sliding_window=3)
    directory = tiny.write_checkpoint("mistral", tmp_path / "hf", model=oracle)
    model, _ = load_model(directory, progress=False)
    ids, mask = padded_batch([9, 7], 9, "right")
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), ForwardOptions(attention="causal")))
    theirs = tiny.oracle_hidden(oracle, ids, mask, "causal")
    np.testing.assert_allclose(ours[mask.astype(bool)], theirs[mask.astype(bool)], atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "llada"])
def test_bfloat16_close_to_float32(family, tmp_path):
    from diffemb_jax.embedding.pooling import l2_normalize, pool

    directory = tiny.write_checkpoint(family, tmp_path / "hf")
    ids, mask = padded_batch(LENGTHS, 9, "right")
    vectors = {}
    for dtype in ("float32", "bfloat16"):
        model, _ = load_model(directory, dtype=dtype, progress=False)
        hidden = model(jnp.asarray(ids), jnp.asarray(mask))
        assert hidden.dtype == jnp.dtype(dtype)
        vectors[dtype] = np.asarray(l2_normalize(pool(hidden, jnp.asarray(mask), jnp.asarray(mask))))
    np.testing.assert_allclose(vectors["bfloat16"], vectors["float32"], atol=2e-2)
