"""The decoder's layers as one lax.scan (ForwardOptions.scan_layers) against transformers and against
the unrolled decoder: hidden states, LoRA gradients with dropout and remat, and a training run whose
checkpoints and adapter carry the unrolled decoder's per-layer names (the unrolled decoder resumes it)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from safetensors.numpy import load_file

import tiny
from conftest import padded_batch
from diffemb_jax.checkpoints import load_model
from diffemb_jax.cli import main as cli
from diffemb_jax.model import Decoder, ForwardOptions, ModelConfig
from diffemb_jax.model.lora import LoraConfig, apply_lora
from diffemb_jax.training.step import StepConfig, loss_and_grads, split_model
from test_training import BATCH, _assert_grads_equal
from training_fixtures import tiny_setup, train_args

LAYERS = 3  # a scan of more than two bodies; every layer's draw offset differs
CFG = ModelConfig("qwen2", 97, 32, LAYERS, 4, 2, 8, 64, qkv_bias=True)


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_scanned_hidden_states_match_transformers_and_the_unrolled_decoder(tmp_path, attention):
    """Oracle: transformers' Qwen2 (float32), 3 layers, left-padded rows; atol 1e-5."""
    oracle = tiny.oracle_model("qwen2", num_hidden_layers=LAYERS)
    model, _ = load_model(tiny.write_checkpoint("qwen2", tmp_path / "m", model=oracle), dtype="float32")
    ids, mask = padded_batch([9, 5, 12], 12, "left")
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, o: nnx.merge(graphdef, s)(ids, mask, o), static_argnums=1)
    scanned = np.asarray(forward(state, ForwardOptions(attention=attention, scan_layers=True)))
    unrolled = np.asarray(forward(state, ForwardOptions(attention=attention)))
    expected = tiny.oracle_hidden(oracle, ids, mask, attention)
    real = mask.astype(bool)
    np.testing.assert_allclose(scanned[real], expected[real], atol=1e-5, rtol=0)
    np.testing.assert_allclose(scanned, unrolled, atol=1e-5, rtol=0)


def _adapted(dropout):
    model = apply_lora(Decoder(CFG, rngs=nnx.Rngs(0)), LoraConfig(rank=4, alpha=8, dropout=dropout))
    graphdef, lora, frozen = split_model(model)
    keys = iter(jax.random.split(jax.random.key(1), 64))  # trained-looking adapters: B is zero at init
    return graphdef, jax.tree.map(lambda x: x + 0.02 * jax.random.normal(next(keys), x.shape), lora), frozen


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_lora_gradients_equal_unrolled(remat):
    """The packed train step's loss and every LoRA gradient, scanned or not, remat per scanned layer,
    the same dropout masks in every layer (each layer's own: with dropout they change the gradient)."""
    graphdef, lora, frozen = _adapted(0.3)

    def grads(scan):
        cfg = StepConfig(batch_size=8, forward=ForwardOptions(remat=remat, scan_layers=scan))
        metrics, grads = jax.jit(lambda l: loss_and_grads(graphdef, l, frozen, BATCH, cfg, jax.random.key(7)))(lora)
        return float(metrics["loss"]), grads

    (loss, unrolled), (scanned_loss, scanned) = grads(False), grads(True)
    assert abs(loss - scanned_loss) <= 1e-5
    assert jax.tree.structure(unrolled) == jax.tree.structure(scanned)  # per-layer paths, not stacked
    _assert_grads_equal(unrolled, scanned)
    if remat != "none":
        return
    without, lora_without, frozen_without = _adapted(0.0)  # the same adapters, no dropout: the masks matter
    step = StepConfig(batch_size=8, forward=ForwardOptions(scan_layers=True))
    _, plain = jax.jit(lambda l: loss_and_grads(without, l, frozen_without, BATCH, step, jax.random.key(7)))(
        lora_without)
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(scanned))) > 1e-3


def test_layers_adapted_unlike_cannot_be_scanned():
    model = apply_lora(Decoder(CFG, rngs=nnx.Rngs(0)), LoraConfig(rank=4, alpha=8, targets=r"layers/0/.*"))
    ids = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="layer 1's parameters differ from layer 0's.*scan_layers=False"):
        model(ids, ids, ForwardOptions(scan_layers=True))
    with pytest.raises(ValueError, match="scan_layers must be True or False"):
        ForwardOptions(scan_layers="yes")


def _shapes(tree) -> dict:
    """{"layers/0/attn/q_proj/kernel_lora_a": shape, ...} (a saved State's trailing "value" dropped)"""
    return {"/".join(str(getattr(k, "key", k)) for k in path).removesuffix("/value"): np.shape(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _restored_lora(workdir, step):
    restored = ocp.CheckpointManager((workdir / "checkpoints").absolute()).restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored["state"]["lora"]


def test_a_scanned_run_saves_per_layer_names_and_an_unrolled_run_resumes_it(tmp_path):
    """Train 2 steps scanned (dropout on), then resume the workdir unrolled (orbax restores into the
    unrolled decoder's LoRA state, so the names must be its own) to step 3. Values are not compared
    after AdamW, whose first steps take the sign of near-zero gradient entries; the step's gradients are
    compared above."""
    model, data = tiny_setup(tmp_path)
    workdir = tmp_path / "run"
    common = ["--config.lora.dropout=0.1", "--config.train.checkpoint_every=1"]
    assert cli(train_args(model, data, workdir, *common, "--config.train.steps=2",
                          "--config.model.scan_layers=True")) == 0
    loaded, _ = load_model(model, dtype="float32")
    unrolled = nnx.state(apply_lora(loaded, LoraConfig(rank=4, alpha=8)), nnx.LoRAParam).to_pure_dict()
    assert _shapes(_restored_lora(workdir, 2)) == _shapes(unrolled)  # "layers/0/attn/q_proj/...": per layer
    names = load_file(workdir / "adapter" / "adapter_model.safetensors").keys()
    assert len(names) == 2 * 7 * 2 and {n.split(".layers.")[1].split(".")[0] for n in names} == {"0", "1"}
    assert cli(train_args(model, data, workdir, *common, "--config.train.steps=3")) == 0  # unrolled resumes
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
