"""Training: the step's exactness (GradCache, remat, data parallel on 8 devices), LoRA-only updates,
a run that lowers the loss, resume after SIGKILL, NaN stop, and config errors."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from diffemb_jax.batching import pack_step, pad_rows, padded_rows
from diffemb_jax.cli import main as cli
from diffemb_jax.model import Decoder, ForwardOptions, ModelConfig
from diffemb_jax.model.lora import LoraConfig, apply_lora, merge_lora
from diffemb_jax.training.step import StepConfig, loss_and_grads, make_optimizer, make_train_step, split_model
from training_fixtures import tiny_setup, train_args

CFG = ModelConfig("qwen2", 97, 32, 2, 4, 2, 8, 64, qkv_bias=True)


def _side(rows, length, seed):
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, 97, (rows, length)).astype(np.int32)
    mask = np.zeros((rows, length), np.int32)
    for i in range(rows):
        mask[i, : rng.randint(2, length + 1)] = 1
    return {"input_ids": ids, "padding_mask": mask, "embed_mask": mask.copy()}


SIDES = {"query": _side(8, 8, 0), "positive": _side(8, 12, 1), "negative": _side(8, 12, 2)}


def _packed(pack=True, multiple=8):
    """SIDES as the train step takes them, in rows of 12 tokens: several texts a row, or one."""
    batch = pack_step(SIDES, global_batch_size=8, num_negatives=1, pack=pack)
    return pad_rows(batch, padded_rows(len(batch["input_ids"]), multiple, 24))


BATCH, ONE_A_ROW = _packed(), _packed(pack=False)
STEP = StepConfig(batch_size=8)


def _adapted(dropout=0.0):
    model = apply_lora(Decoder(CFG, rngs=nnx.Rngs(0)), LoraConfig(rank=4, alpha=8, dropout=dropout))
    graphdef, lora, frozen = split_model(model)
    key = iter(jax.random.split(jax.random.key(1), 64))  # trained-looking adapters: B is zero at init
    lora = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(next(key), x.shape), lora)
    return model, graphdef, lora, frozen


KEY = jax.random.key(7)


def _grads(remat="none", chunk=0, batch=BATCH, dropout=0.0, packed=True, **step):
    _, graphdef, lora, frozen = _adapted(dropout)
    cfg = StepConfig(batch_size=8, grad_cache_chunk=chunk, packed=packed, forward=ForwardOptions(remat=remat), **step)
    metrics, grads = jax.jit(lambda l, f, b: loss_and_grads(graphdef, l, f, b, cfg, KEY))(lora, frozen, batch)
    return float(metrics["loss"]), grads


def _assert_grads_equal(a, b, rel=1e-5):
    """Equal to `rel` of the largest gradient entry: float32 sums taken in another order (chunks,
    recomputation) differ by a few ulps, and these gradients reach ~40 (one ulp: 4e-6)."""
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(a))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=rel * scale, rtol=0)


def test_packed_step_equals_one_text_a_row():
    """Texts packed several to a row give the loss and gradients they give one to a row."""
    assert len(BATCH["input_ids"]) < len(ONE_A_ROW["input_ids"])
    assert max(len(set(row[row > 0].tolist())) for row in BATCH["segments"]) >= 2  # rows really hold several
    loss, grads = _grads()
    for packed in (True, False):  # one text a row: as packed rows, or as plain padded ones
        alone_loss, alone = _grads(batch=ONE_A_ROW, packed=packed)
        assert abs(loss - alone_loss) <= 1e-5
        _assert_grads_equal(grads, alone)


def test_packed_step_loss_and_gradients_equal_peft(tmp_path):
    """Oracle: transformers + peft with the same adapters, on each side padded (llm2vec's batches),
    bidirectional through a 4-D mask, llm2vec's mean pooling and in-batch loss (cosine x 50 over
    [positives; negatives]): the packed step's loss and every LoRA gradient."""
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file

    import tiny
    from diffemb_jax.checkpoints import load_model
    from diffemb_jax.checkpoints.peft_adapters import save_peft_adapter

    oracle = tiny.oracle_model("qwen2")
    model, _ = load_model(tiny.write_checkpoint("qwen2", tmp_path / "model", model=oracle), dtype="float32")
    lora_cfg = LoraConfig(rank=4, alpha=8, dropout=0.0)
    adapted = apply_lora(model, lora_cfg)
    graphdef, lora, frozen = split_model(adapted)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    lora = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), lora)
    metrics, grads = jax.jit(lambda l: loss_and_grads(graphdef, l, frozen, BATCH, STEP, KEY))(lora)

    def under_peft_names(state, name):
        nnx.update(adapted, state)
        return save_peft_adapter(adapted, lora_cfg, tmp_path / name)

    under_peft_names(lora, "adapter")
    expected = load_file(under_peft_names(grads, "grads") / "adapter_model.safetensors")
    reference = PeftModel.from_pretrained(oracle, tmp_path / "adapter", is_trainable=True)

    def embed(side):
        ids = torch.as_tensor(SIDES[side]["input_ids"]).long()
        real = torch.as_tensor(SIDES[side]["padding_mask"]).bool()
        mask = real[:, None, None, :].expand(-1, 1, ids.shape[1], -1)
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        hidden = reference.base_model.model.model(input_ids=ids, attention_mask=mask,
                                                  position_ids=positions).last_hidden_state
        weights = real.float()[..., None]
        return torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)

    q, p, n = map(embed, ("query", "positive", "negative"))
    loss = torch.nn.functional.cross_entropy(q @ torch.cat([p, n]).T * 50.0, torch.arange(8))
    loss.backward()
    assert float(metrics["loss"]) == pytest.approx(loss.item(), rel=1e-5)
    got = {name.replace(".default", ""): param.grad.numpy() for name, param in reference.named_parameters()
           if param.requires_grad}
    assert got.keys() == expected.keys() and len(got) == 2 * 7 * 2  # A and B of 7 projections, 2 layers
    scale = max(np.abs(g).max() for g in got.values())
    assert scale > 1e-2
    for name, grad in got.items():
        np.testing.assert_allclose(expected[name], grad, atol=1e-5 * scale, rtol=0, err_msg=name)


@pytest.mark.parametrize("chunk", [3, 8, 32])  # 16 rows: 5 chunks and a row; 2 chunks; one short chunk
def test_grad_cache_equals_plain_step(chunk):
    loss, grads = _grads()
    cached_loss, cached = _grads(chunk=chunk)
    assert abs(loss - cached_loss) <= 1e-5
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-2  # gradients are not all ~0
    _assert_grads_equal(grads, cached)


@pytest.mark.parametrize("loss", ["in_batch", "per_query"])
def test_grad_cache_equals_plain_step_with_matryoshka_dimensions(loss):
    """GradCache takes the loss of its cached embeddings, so the nested-dimension loss (the full 32
    left out) comes out as the plain step's, and so do its gradients."""
    _, graphdef, lora, frozen = _adapted()
    runs = []
    for chunk in (0, 3):
        cfg = StepConfig(batch_size=8, grad_cache_chunk=chunk, loss=loss, matryoshka_dims=(8, 20),
                         matryoshka_weights=(1.0, 0.5))
        runs.append(jax.jit(lambda l, f, b: loss_and_grads(graphdef, l, f, b, cfg, KEY))(lora, frozen, BATCH))
    (metrics, grads), (cached_metrics, cached) = runs
    assert set(metrics) == set(cached_metrics) == {"loss", "accuracy", "loss_dim8", "accuracy_dim8", "loss_dim20",
                                                   "accuracy_dim20"}
    for key in metrics:
        assert abs(float(metrics[key]) - float(cached_metrics[key])) <= 1e-5, key
    assert float(metrics["loss"]) == pytest.approx(float(metrics["loss_dim8"]) + 0.5 * float(metrics["loss_dim20"]))
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-2
    _assert_grads_equal(grads, cached)


def test_grad_cache_with_dropout_is_the_gradient_of_its_loss():
    """GradCache re-embeds each chunk with the masks of its first pass; with other masks its gradient
    would belong to another loss. Oracle: central finite differences of the loss along a random
    direction (h = 1e-4 matched to 4e-5 when measured; 1e-2 is too coarse for this curvature)."""
    _, graphdef, lora, frozen = _adapted(dropout=0.3)
    cfg = StepConfig(batch_size=8, grad_cache_chunk=3)
    run = jax.jit(lambda l: loss_and_grads(graphdef, l, frozen, BATCH, cfg, KEY))
    _, grads = run(lora)
    keys = iter(jax.random.split(jax.random.key(5), 64))
    direction = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape), lora)
    h = 1e-4
    moved = [float(run(jax.tree.map(lambda x, d: x + sign * h * d, lora, direction))[0]["loss"]) for sign in (1, -1)]
    finite_difference = (moved[0] - moved[1]) / (2 * h)
    along = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    assert abs(along) > 1e-2  # a direction the loss moves along
    assert along == pytest.approx(finite_difference, rel=2e-3)
    _, plain = _grads(chunk=3)  # the masks matter: without dropout the gradient is another one
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain))) > 1e-3


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("remat", ["full", "dots", "dots_all"])
def test_remat_equals_no_remat(remat, dropout):
    """With LoRA dropout too: the same masks are drawn whether or not a block is rematerialised."""
    loss, grads = _grads(dropout=dropout)
    remat_loss, remat_grads = _grads(remat=remat, dropout=dropout)
    assert abs(loss - remat_loss) <= 1e-5
    _assert_grads_equal(grads, remat_grads)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_dropout_masks_under_jit_equal_eager_draws(remat):
    """Drawn eagerly, each LoRA's mask comes from the key and its own draw index. Under jit each
    LoRA must draw the same masks, not one mask reused by all (a bug this guards)."""
    model = apply_lora(Decoder(CFG, rngs=nnx.Rngs(0)), LoraConfig(rank=4, alpha=8, dropout=0.5))
    nnx.update(model, jax.tree.map(lambda x: x + 0.3, nnx.state(model, nnx.LoRAParam)))  # B is zero at init
    graphdef, state = nnx.split(model)
    side = SIDES["positive"]
    ids, mask = jnp.asarray(side["input_ids"]), jnp.asarray(side["padding_mask"])
    key = jax.random.key(3)

    def forward(state, ids, mask, key):
        return nnx.merge(graphdef, state)(ids, mask, ForwardOptions(remat=remat), dropout_key=key)

    eager = np.asarray(forward(state, ids, mask, key))
    without_dropout = np.asarray(merge_lora(model, LoraConfig(rank=4, alpha=8))(ids, mask))
    assert np.abs(eager - without_dropout).max() > 1e-2  # the masks matter here
    np.testing.assert_allclose(np.asarray(jax.jit(forward)(state, ids, mask, key)), eager, atol=1e-5)
    unset = nnx.merge(graphdef, state)  # no dropout key: inference, no dropout
    np.testing.assert_allclose(np.asarray(unset(ids, mask)), without_dropout, atol=1e-5)


def test_dropout_mask_is_jax_threefry_of_its_counters():
    """Oracle: jax's public Threefry-2x32 (jax.extend.random.threefry_2x32) of the counter pairs
    (row, index * 2^16 + block), each 64-bit block cut into four 16-bit draws, block j giving
    columns j, j + q, j + 2q and j + 3q (q = ceil(width / 4))."""
    from jax.extend.random import threefry_2x32

    from diffemb_jax.model.lora_linear import dropout_keep_mask

    key, index, keep = jax.random.key(7), 5, 0.9
    for shape in [(3, 5, 8), (4, 7), (2, 1)]:
        *lead, width = shape
        rows, q = int(np.prod(lead)), -(-width // 4)
        row, block = np.meshgrid(np.arange(rows, dtype=np.uint32), np.arange(q, dtype=np.uint32), indexing="ij")
        words = np.asarray(threefry_2x32(jax.random.key_data(key), np.concatenate(
            [row.ravel(), (index << 16) + block.ravel()]))).reshape(2, rows, q)
        draws = np.concatenate([words[0] & 0xFFFF, words[0] >> 16, words[1] & 0xFFFF, words[1] >> 16], axis=1)
        expected = (draws < round(keep * 65536))[:, :width].reshape(shape)
        mask = dropout_keep_mask(key, index, shape, keep)
        assert mask.dtype == jnp.bool_ and mask.shape == shape
        np.testing.assert_array_equal(np.asarray(mask), expected)
        np.testing.assert_array_equal(np.asarray(jax.jit(dropout_keep_mask, static_argnums=(2, 3))(
            key, jnp.uint32(index), shape, keep)), expected)  # a traced index: the draw under remat


def test_dropout_masks_keep_the_rate_and_are_independent():
    """Each of the four 16-bit draws of a block keeps the rate, and masks of other draws, other keys,
    the other draws of one block and neighbouring rows are independent (chi-squared, scipy)."""
    from scipy.stats import chi2_contingency

    from diffemb_jax.model.lora_linear import dropout_keep_mask

    keep = 0.95
    mask = np.asarray(dropout_keep_mask(jax.random.key(0), 0, (1000, 1000), keep))
    assert abs(mask.mean() - keep) < 0.002
    quarters = np.split(mask, 4, axis=1)
    for quarter in quarters:
        assert abs(quarter.mean() - keep) < 0.003

    def independent(a, b):
        table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
        return chi2_contingency(table).pvalue > 1e-3

    pairs = {"next draw": np.asarray(dropout_keep_mask(jax.random.key(0), 1, (1000, 1000), keep)),
             "other key": np.asarray(dropout_keep_mask(jax.random.key(1), 0, (1000, 1000), keep))}
    for name, other in pairs.items():
        assert (mask != other).mean() > 0.05, name
        assert independent(mask, other), name
    assert independent(quarters[0], quarters[1])  # the two halves of a word
    assert independent(quarters[0], quarters[2])  # the two words of a block
    assert independent(mask[:-1], mask[1:])  # neighbouring rows
    assert not independent(mask, mask | (np.arange(1000) % 2 == 0))  # the test can tell


def test_dropout_mask_past_its_counters_is_an_error():
    from diffemb_jax.model.lora_linear import dropout_keep_mask

    with pytest.raises(ValueError, match="counters' range"):
        dropout_keep_mask(jax.random.key(0), 0, (2, 4 * 65536 + 4), 0.9)


def test_each_adapter_draws_its_own_mask_in_forward_order():
    """Draw indices are fixed when the adapters are made: 0, 1, ... in the order a forward pass runs the
    projections (so masks do not depend on how often, or under which transform, the model is called)."""
    from diffemb_jax.model.decoder import BLOCK_PROJECTIONS

    model, *_ = _adapted()
    draws = [getattr(getattr(block, path.split("/")[0]), path.split("/")[1]).draw
             for block in model.layers for path in BLOCK_PROJECTIONS]
    assert draws == list(range(len(BLOCK_PROJECTIONS) * CFG.num_layers))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lora_backward_equals_autodiff_of_the_plain_product(monkeypatch, dtype):
    """Oracle: jax autodiff through the plain adapter product (x @ A) @ B, on the input dropped out by a
    plain jnp.where with the same masks; ours orders the products otherwise and keeps only the masks."""
    from diffemb_jax.model import lora_linear

    model = apply_lora(Decoder(CFG, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype),
                       LoraConfig(rank=4, alpha=8, dropout=0.1))
    graphdef, lora, frozen = split_model(model)
    key = iter(jax.random.split(jax.random.key(1), 64))
    lora = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(next(key), x.shape), lora)

    def run():
        return jax.jit(lambda l, f, b: loss_and_grads(graphdef, l, f, b, STEP, KEY))(lora, frozen, BATCH)

    def reference(x, keep_mask, a, b, keep):
        x = jnp.where(keep_mask, x / keep, 0).astype(x.dtype)
        return jax.lax.dot_general(jax.lax.dot_general(x, a, lora_linear._ROWS), b, lora_linear._ROWS)

    metrics, grads = run()
    monkeypatch.setattr(lora_linear, "_dropped_low_rank", reference)
    ref_metrics, ref_grads = run()
    assert float(metrics["loss"]) == pytest.approx(float(ref_metrics["loss"]), rel=1e-6 if dtype == jnp.float32 else 2e-2)
    _assert_grads_equal(ref_grads, grads, rel=1e-5 if dtype == jnp.float32 else 2e-2)
    lora_b = [x for path, x in nnx.to_flat_state(grads) if path[-1] == "kernel_lora_b"]
    assert min(float(jnp.abs(g[...]).max()) for g in lora_b) > 0  # every adapter is in the loss


def test_only_lora_parameters_train():
    model, graphdef, lora, frozen = _adapted()
    assert {p[-1] for p, _ in nnx.to_flat_state(lora)} == {"kernel_lora_a", "kernel_lora_b"}
    assert len(jax.tree.leaves(lora)) == 2 * 7 * CFG.num_layers  # q k v o gate up down, A and B each
    tx, schedule = make_optimizer(1e-3, 0, 10)  # no warm-up: the first update is not zero
    opt_state = tx.init(lora)
    assert sum(x.size for x in jax.tree.leaves(opt_state)) < 3 * sum(x.size for x in jax.tree.leaves(lora))
    frozen_before = jax.tree.map(np.asarray, frozen)
    step = make_train_step(graphdef, tx, schedule, STEP)
    before = jax.tree.map(np.asarray, lora)
    new_lora, _, metrics = step(lora, opt_state, frozen, 0, BATCH)
    assert np.isfinite(float(metrics["loss"]))
    assert any(np.abs(np.asarray(a) - b).max() > 0 for a, b in zip(jax.tree.leaves(new_lora), jax.tree.leaves(before)))
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_merged_lora_equals_adapted_model():
    model, _, lora, _ = _adapted()
    nnx.update(model, lora)
    merged = merge_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.0))
    assert not nnx.state(merged, nnx.LoRAParam)
    ids, mask = jnp.asarray(SIDES["positive"]["input_ids"]), jnp.asarray(SIDES["positive"]["padding_mask"])
    plain = Decoder(CFG, rngs=nnx.Rngs(0))
    assert float(jnp.abs(model(ids, mask) - plain(ids, mask)).max()) > 1e-3  # the adapters do something
    np.testing.assert_allclose(np.asarray(merged(ids, mask)), np.asarray(model(ids, mask)), atol=1e-5)


DATA_PARALLEL = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    sys_path = __import__("sys").path.insert(0, "tests")
    import test_training as t
    assert jax.device_count() == 8
    _, graphdef, lora, frozen = t._adapted()
    fn = jax.jit(lambda l, f, b: t.loss_and_grads(graphdef, l, f, b, t.STEP, t.KEY))
    one = fn(lora, frozen, t.BATCH)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch = jax.device_put(t.BATCH, NamedSharding(mesh, P("data")))
    assert len(batch["input_ids"].sharding.device_set) == 8
    params = jax.device_put((lora, frozen), NamedSharding(mesh, P()))
    many = fn(*params, batch)
    np.testing.assert_allclose(float(many[0]["loss"]), float(one[0]["loss"]), rtol=1e-6)
    t._assert_grads_equal(one[1], many[1])
    print("OK")
""")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "PYTEST"))}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def test_data_parallel_step_equals_single_device():
    """Every device's queries see every device's documents: 8 shards give the one-device loss and grads."""
    result = subprocess.run([sys.executable, "-c", DATA_PARALLEL], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).parent.parent,
                            env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")


def _losses(workdir):
    return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


def test_tiny_training_lowers_the_loss(tmp_path):
    model, data = tiny_setup(tmp_path)
    assert cli(train_args(model, data, tmp_path / "run")) == 0
    losses = list(_losses(tmp_path / "run").values())
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def _final_lora(workdir, step):
    restored = ocp.CheckpointManager((workdir / "checkpoints").absolute()).restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored["state"]["lora"]


def test_resume_after_sigkill_is_exact(tmp_path):
    """A run killed mid-way and resumed gives the uninterrupted run's losses and adapter, to the bit.
    The persistent compilation cache is on, as the CLI has it: the first run compiles the step and the
    two after it load the program it wrote, which changes no bit either."""
    model, data = tiny_setup(tmp_path)
    steps = ["--config.train.steps=10", "--config.train.checkpoint_every=3", "--config.lora.dropout=0.1"]
    command = [sys.executable, "-m", "diffemb_jax.cli"]
    env = _env(JAX_ENABLE_COMPILATION_CACHE="true", JAX_LOG_COMPILES="1", DIFFEMB_CACHE=str(tmp_path / "cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    straight = tmp_path / "straight"
    logs = [subprocess.run(command + train_args(model, data, straight, *steps), check=True, env=env,
                           capture_output=True, text=True, timeout=900).stderr]

    killed = tmp_path / "killed"
    process = subprocess.Popen(command + train_args(model, data, killed, *steps), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if (killed / "metrics.jsonl").exists() and len(_losses(killed)) >= 5:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = len(_losses(killed))
    assert 5 <= interrupted_at < 10, "the run was not killed in the middle"
    logs.append(subprocess.run(command + train_args(model, data, killed, *steps), check=True, env=env,
                               capture_output=True, text=True, timeout=900).stderr)
    hits = [log.count("Persistent compilation cache hit for 'jit_step_fn'") for log in logs]
    assert hits[0] == 0 and hits[1] >= 1, hits
    assert _losses(killed) == _losses(straight)  # identical floats, every step
    a, b = _final_lora(straight, 10), _final_lora(killed, 10)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_bf16_with_dropout_and_remat_trains(tmp_path):
    model, data = tiny_setup(tmp_path)
    args = ["--config.train.steps=3", "--config.model.dtype=bfloat16", "--config.lora.dropout=0.1",
            "--config.train.remat=full"]
    assert cli(train_args(model, data, tmp_path / "run", *args)) == 0
    losses = list(_losses(tmp_path / "run").values())
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_nan_loss_stops_after_saving_last_good_state(tmp_path, capsys):
    model, data = tiny_setup(tmp_path)
    assert cli(train_args(model, data, tmp_path / "run", "--config.loss.scale=nan")) == 2
    err = capsys.readouterr().err
    assert "the loss is nan and the gradient norm nan at step 1" in err and "last good state (step 0)" in err
    assert ocp.CheckpointManager((tmp_path / "run" / "checkpoints").absolute()).latest_step() == 0


def test_a_nan_gradient_with_a_finite_loss_keeps_the_last_good_state(tmp_path, capsys, monkeypatch):
    """The fault injected: NaN gradients under a finite loss. Kept unchecked, the first step's update
    would make every adapter NaN and the next step save those as the last good state."""
    import diffemb_jax.training.step as step_module

    model, data = tiny_setup(tmp_path)
    plain = step_module.loss_and_grads

    def nan_gradients(*args):
        metrics, grads = plain(*args)
        return metrics, jax.tree.map(lambda g: g * jnp.nan, grads)

    monkeypatch.setattr(step_module, "loss_and_grads", nan_gradients)
    assert cli(train_args(model, data, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "and the gradient norm nan at step 1" in err and "the loss is nan" not in err
    saved = ocp.StandardCheckpointer().restore((tmp_path / "run" / "checkpoints" / "0" / "state").absolute())
    leaves = jax.tree.leaves(saved["lora"])
    assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)


def test_unknown_config_key_is_named(tmp_path, capsys):
    model, data = tiny_setup(tmp_path)
    assert cli(train_args(model, data, tmp_path / "run", "--config.train.learning_rate=1e-3")) == 2
    assert "learning_rate" in capsys.readouterr().err


def test_missing_model_path_is_explained(tmp_path, capsys):
    config = Path(__file__).parent.parent / "configs" / "tiny.py"
    assert cli(["train", f"--config={config}", f"--workdir={tmp_path / 'run'}"]) == 2
    assert "config.model.path is empty" in capsys.readouterr().err


def _tiny_config(model, data, **train):
    """configs/tiny.py for `model` and `data`, with train.* overrides."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_cfg", Path(__file__).parent.parent / "configs" / "tiny.py")
    tiny_cfg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_cfg)
    config = tiny_cfg.get_config()
    config.model.path, config.data.files = str(model), (str(data),)
    config.train.update(train)
    return config


def test_the_step_compiles_once_per_shape_and_keeps_placements(tmp_path):
    """Packed, a step's rows vary with its texts: one program per (rows, length) met, and fewer rows
    than one text a row, which compiles once."""
    from diffemb_jax.training.trainer import Trainer

    model, data = tiny_setup(tmp_path)
    rows = {}
    for pack in (True, False):
        config = _tiny_config(model, data, steps=3)
        config.data.pack = pack
        trainer = Trainer(config, tmp_path / f"run-{pack}")
        before = jax.tree.map(lambda x: x.sharding, trainer.lora)
        packed, rows[pack] = trainer.packed, []
        trainer.packed = lambda sides, packed=packed, seen=rows[pack]: seen.append(packed(sides)) or seen[-1]
        trainer.run(progress=False)
        assert trainer.train_step._cache_size() == len({b["input_ids"].shape for b in rows[pack]})
        assert jax.tree.map(lambda x: x.sharding, trainer.lora) == before
    assert {len(b["input_ids"]) for b in rows[False]} == {8 * 3}  # global batch 8: a query, a positive, a negative
    assert max(len(b["input_ids"]) for b in rows[True]) < 8 * 3
    for packed, alone in zip(rows[True], rows[False]):  # the same texts, tokens and embedded tokens
        for key in ("segments", "embed_mask"):
            assert np.array_equal(np.sort(packed[key][packed[key] > 0]), np.sort(alone[key][alone[key] > 0]))


def test_a_step_with_a_row_for_each_text_goes_one_a_row_with_the_same_embeddings(tmp_path):
    """Where packing's rows, padded, leave a row for each text, the trainer lays the step one text a row
    (cuDNN then takes each row's length, not the texts' runs or mask: test_accelerator_lowering):
    the layout changes, not the embeddings (xla kernel, float32, to 1e-5); where packing saves rows, it packs."""
    from diffemb_jax.training.step import _embed
    from diffemb_jax.training.trainer import Trainer, step_config

    trainer = Trainer(_tiny_config(*tiny_setup(tmp_path), steps=1), tmp_path / "run")
    rng = np.random.RandomState(3)

    def sides(query_lengths):  # 8 queries, positives and negatives (the tiny config's global batch)
        counts = {"query": query_lengths, "positive": [38] * 8, "negative": [38] * 8}
        out = {}
        for side, lengths in counts.items():
            mask = (np.arange(64)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
            out[side] = {"input_ids": rng.randint(1, 97, mask.shape).astype(np.int32) * mask,
                         "padding_mask": mask, "embed_mask": mask}
        return out

    # 20 texts of 38 tokens, 4 of 20 in rows of 64: packed, 20 rows (4 of them hold two), padded to 24.
    step = sides([20] * 4 + [38] * 4)
    batch = trainer.packed(step)
    assert not trainer.packs(len(batch["input_ids"]))
    assert max(len(set(row[row > 0].tolist())) for row in batch["segments"]) == 1  # one text a row
    packed = pack_step(step, global_batch_size=8, num_negatives=1, length=batch["input_ids"].shape[1])
    assert max(len(set(row[row > 0].tolist())) for row in packed["segments"]) == 2
    packed = pad_rows(packed, len(batch["input_ids"]))
    cfg = step_config(trainer.config)
    alone = _embed(trainer.graphdef, trainer.lora, trainer.frozen, batch, dataclasses.replace(cfg, packed=False), None)
    together = _embed(trainer.graphdef, trainer.lora, trainer.frozen, packed, cfg, None)
    assert bool((jnp.abs(together).sum(axis=1) > 0).all())  # every one of the 24 texts embedded
    np.testing.assert_allclose(np.asarray(alone), np.asarray(together), atol=1e-5)

    short = trainer.packed(sides([4] * 8))  # 8 short queries fill the rows' room: 16 rows, fewer than 24 texts
    assert trainer.packs(len(short["input_ids"]))


def test_the_next_batch_is_packed_while_the_step_runs(tmp_path):
    """The host reads and packs step n+1's batch after dispatching step n and before waiting for its
    metrics, so the device is not left idle meanwhile."""
    from diffemb_jax.training.trainer import Trainer

    trainer = Trainer(_tiny_config(*tiny_setup(tmp_path), steps=3), tmp_path / "run")
    events, packed, step = [], trainer.packed, trainer.train_step

    class Fetched:  # a metric that notes when the loop waits for it
        def __init__(self, value, n):
            self.value, self.n = value, n

        def __float__(self):
            events.append(f"wait {self.n}")
            return float(self.value)

    def traced_step(*args, **layout):
        lora, opt_state, metrics = step(*args, **layout)
        events.append(f"step {args[3]}")
        return lora, opt_state, {k: Fetched(v, args[3]) for k, v in metrics.items()}

    trainer.packed = lambda sides: events.append("pack") or packed(sides)
    trainer.train_step = traced_step
    trainer.run(progress=False)
    order = [e for i, e in enumerate(events) if not (i and events[i - 1] == e)]  # one "wait" per metric
    assert order == ["pack", "step 0", "pack", "wait 0", "step 1", "pack", "wait 1", "step 2", "wait 2"], events


def test_the_profile_window_traces_the_steps_asked_for(tmp_path):
    """train.profile_from=2, profile_steps=2 of 4 steps: WORKDIR/profile holds a trace of steps 2 and
    3, the step program run twice in it (not the first step, which compiles, nor the last)."""
    import gzip

    from diffemb_jax.training.trainer import Trainer

    Trainer(_tiny_config(*tiny_setup(tmp_path), steps=4, profile_from=2, profile_steps=2), tmp_path / "run").run(
        progress=False)
    (xplane,) = (tmp_path / "run" / "profile").glob("plugins/profile/*/*.xplane.pb")
    assert xplane.stat().st_size > 0
    (perfetto,) = xplane.parent.glob("perfetto_trace.json.gz")
    events = json.loads(gzip.decompress(perfetto.read_bytes()))["traceEvents"]
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "PjitFunction(step_fn)")
    calls = [span for i, span in enumerate(spans) if not i or span[0] > spans[i - 1][1]]  # a call nests two spans
    assert len(calls) == 2, spans
    with pytest.raises(ValueError, match="profile_from"):
        Trainer(_tiny_config(*tiny_setup(tmp_path / "bad"), profile_from=-1), tmp_path / "bad-run")


def test_an_error_reading_the_next_batch_comes_after_the_step_is_logged_and_saved(tmp_path):
    from diffemb_jax.training.trainer import Trainer

    config = _tiny_config(*tiny_setup(tmp_path), steps=4, checkpoint_every=2, log_every=1)
    trainer = Trainer(config, tmp_path / "run")
    packed, calls = trainer.packed, []

    def third_fails(sides):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("the disk went away")
        return packed(sides)

    trainer.packed = third_fails
    with pytest.raises(OSError, match="the disk went away"):
        trainer.run(progress=False)
    assert list(_losses(tmp_path / "run")) == [1, 2]  # step 2 ran while batch 3 was being read
    assert ocp.CheckpointManager((tmp_path / "run" / "checkpoints").absolute()).latest_step() == 2


def test_plan_reads_neither_weights_nor_data(tmp_path, monkeypatch, capsys):
    """`diffemb plan` builds the step from the model's config: no weight is loaded, no data file is needed."""
    import diffemb_jax.checkpoints.checkpoint as checkpoint_module

    model, _ = tiny_setup(tmp_path)
    for name in ("load_decoder", "load_converted"):
        monkeypatch.setattr(checkpoint_module, name, lambda *a, **k: pytest.fail("plan read weights"))
    config = Path(__file__).parent.parent / "configs" / "tiny.py"
    assert cli(["plan", f"--config={config}", f"--workdir={tmp_path / 'run'}", f"--config.model.path={model}"]) == 0
    table = capsys.readouterr().out
    sizes = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in table.splitlines()
             if line.startswith("| ") and not line.startswith("| part")}
    assert set(sizes) >= {"frozen_params", "lora_params", "optimizer_state", "arguments", "temporaries", "total"}
    assert sizes["frozen_params"] > 0 and sizes["temporaries"] > 0  # MiB, to 0.1: the adapters show 0.0
    assert "\nfits: " in table  # the tiny step on this machine's memory
    import diffemb_jax.memory

    monkeypatch.setattr(diffemb_jax.memory, "device_capacity", lambda: ("a small device", 2**20))
    assert cli(["plan", f"--config={config}", f"--workdir={tmp_path / 'run'}", f"--config.model.path={model}"]) == 0
    verdict = capsys.readouterr().out.splitlines()[-1]
    assert verdict.startswith("does not fit:") and "a small device" in verdict and "mesh.fsdp" in verdict


def _simcse_views(dropout):
    """The query and positive embeddings of 8 texts that are each their own positive (format simcse)."""
    from diffemb_jax.training.step import _embed
    side = _side(8, 8, 3)
    batch = pack_step({"query": side, "positive": side, "negative": {k: v[:0] for k, v in side.items()}},
                      global_batch_size=8, num_negatives=0)
    _, graphdef, lora, frozen = _adapted(dropout)
    cfg = StepConfig(batch_size=8, num_negatives=0)
    vectors = np.asarray(jax.jit(lambda l, f, b: _embed(graphdef, l, f, b, cfg, KEY))(lora, frozen, batch))
    assert vectors.shape[0] == 16
    return vectors[:8], vectors[8:]


def test_simcse_views_differ_only_by_dropout():
    """SimCSE's two views of a text are the same tokens at two places of the packed rows; LoRA dropout
    masks are drawn per position, so with dropout they differ, and without it they are equal."""
    q, p = _simcse_views(0.0)
    np.testing.assert_allclose(q, p, atol=1e-5, rtol=0)
    q, p = _simcse_views(0.3)
    assert np.abs(q - p).max(axis=1).min() > 1e-3  # every text's two views differ


def test_simcse_file_trains_two_steps(tmp_path):
    import tiny
    model, _ = tiny_setup(tmp_path)
    data = tmp_path / "simcse.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(tiny.WORDS[i : i + 5])}) + "\n" for i in range(16)))
    args = train_args(model, data, tmp_path / "run", "--config.data.format=simcse", "--config.data.num_negatives=0",
                      "--config.train.steps=2", "--config.lora.dropout=0.3")
    assert cli(args) == 0
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values()), losses


def test_resume_drops_a_torn_last_metrics_line(tmp_path):
    """The fault injected: a run killed while writing step 4's line leaves half of it."""
    from diffemb_jax.training.trainer import MetricsLog

    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)] + ['{"step": 4, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    log = MetricsLog(tmp_path, resume_step=3)
    log.write({"step": 4, "loss": 0.25})
    log.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
