"""configs/recipe.py: every model x recipe builds, its values read back, and a few match the
reference's final train_configs (siyue-zhang/DiffEmbed at 3a49bbc9)."""

import importlib.util
from pathlib import Path

import numpy as np
import optax
import pytest

from diffemb_jax.training.step import make_optimizer

_spec = importlib.util.spec_from_file_location("recipe", Path(__file__).parent.parent / "configs" / "recipe.py")
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)

NAMES = tuple(recipe.RECIPES) + tuple(recipe.ALIASES)


@pytest.mark.parametrize("model", recipe.MODELS)
@pytest.mark.parametrize("name", NAMES)
def test_each_recipe_builds_and_reads_back(model, name):
    c = recipe.get_config(f"{model},{name}")
    r = recipe.recipe_values(model, name)
    assert c.train.lr == r["lr"] > 0 and c.train.steps == r["steps"] > 0
    assert 0 <= c.train.warmup_steps < c.train.steps
    assert c.train.global_batch_size == r["global_batch_size"] and c.train.global_batch_size % 8 == 0
    assert c.lora.rank == r["rank"] and c.lora.alpha == 2 * c.lora.rank  # run_supervised.py: alpha = 2 r
    assert c.data.format == r["format"] and c.loss.kind == r["loss"] and c.loss.scale == r["scale"] > 0
    assert c.data.query_max_length > 0 and c.data.doc_max_length > 0
    assert c.model.pooling == "mean"
    assert c.data.num_negatives == (0 if c.data.format == "simcse" else 15 if c.loss.kind == "per_query" else 1)
    assert c.model.attention == ("bidirectional" if model in recipe.DIFFUSION else "causal")


def test_values_from_the_reference_configs():
    # supervised/Dream_long.json: lr 5e-5, stop_after_n_steps 4000, 4 per device x 4 GPUs
    c = recipe.get_config("dream-7b,long_documents")
    assert (c.train.lr, c.train.steps, c.train.global_batch_size) == (5e-5, 4000, 16)
    # supervised/MetaLlama3_long.json: lr 5e-5, warmup_steps 200
    c = recipe.get_config("llama3-8b,long_documents")
    assert (c.train.lr, c.train.warmup_steps) == (5e-5, 200)
    # supervised/Qwen2_if.json: 8 per device x 4 GPUs x 4 accumulation, max_seq_length 304, doc_max_length 196, r 32
    c = recipe.get_config("qwen2.5-7b,instruction_following")
    assert (c.train.global_batch_size, c.data.query_max_length, c.data.doc_max_length, c.lora.rank) == (128, 304, 196, 32)
    # simcse/Qwen2.json: lr 3e-5, loss_scale 20, 32 x 4 x 2, max_seq_length 128, 2000 steps
    c = recipe.get_config("qwen2.5-7b,simcse")
    assert (c.train.lr, c.loss.scale, c.train.global_batch_size, c.data.query_max_length, c.train.steps) == (
        3e-5, 20.0, 256, 128, 2000)
    # llada-8b has no reference config: it takes Dream's
    assert recipe.get_config("llada-8b,reasoning") == recipe.get_config("dream-7b,theorem")
    # mntp/Qwen2.json: mlm_probability 0.2, max_seq_length 512, lora_r 16, stop_after_n_steps 4000
    m = recipe.MNTP["qwen2.5-7b"]
    assert (m["mlm_probability"], m["max_seq_length"], m["lora_rank"], m["steps"]) == (0.2, 512, 16, 4000)


def test_unknown_model_or_recipe_is_refused():
    with pytest.raises(ValueError, match="RECIPE in"):
        recipe.get_config("dream-7b,nope")
    with pytest.raises(ValueError, match="MODEL in"):
        recipe.get_config("gpt2,simcse")


def test_schedules():
    lrs = lambda s: np.array([float(s(i)) for i in range(0, 101, 10)])
    _, linear = make_optimizer(1.0, 10, 100)
    assert lrs(linear)[[0, 1, 10]].tolist() == [0.0, 1.0, 0.0]
    _, long = make_optimizer(1.0, 10, 100, decay_steps=410)  # decays over 410 steps, run stops at 100
    assert float(long(100)) == pytest.approx(1 - 90 / 400)
    _, constant = make_optimizer(1.0, 10, 100, schedule="constant")  # HF's constant: no warm-up
    assert (lrs(constant) == 1.0).all()
    with pytest.raises(ValueError, match="linear or constant"):
        make_optimizer(1.0, 10, 100, schedule="cosine")
    assert isinstance(make_optimizer(1.0, 0, 100)[0], optax.GradientTransformation)
