"""Sharded training on 8 simulated CPU devices: every mesh gives the one-device losses and LoRA
update (LoRA dropout on), parameters really are sharded, and per-device parameter memory falls as
1/n with fsdp. Two processes (JAX's distributed runtime on the CPU) train and encode as one device."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from diffemb_jax import parallel
from training_fixtures import tiny_setup

ROOT = Path(__file__).parent.parent
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]
GRAD_CACHE = (2, 2, 2, 4)  # GradCache, 4 rows a chunk: each of the 4 batch shards gives a chunk one

TRAIN = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, "tests")
    import importlib.util
    from diffemb_jax.training.trainer import Trainer
    spec = importlib.util.spec_from_file_location("tiny_cfg", "configs/tiny.py")
    tiny_cfg = importlib.util.module_from_spec(spec); spec.loader.exec_module(tiny_cfg)
    model, data, out = sys.argv[1:4]
    meshes, dropout = json.loads(sys.argv[4]), float(sys.argv[5])
    results = {}
    for shape in meshes:  # (data, fsdp, tensor[, GradCache rows a chunk])
        c = tiny_cfg.get_config()
        c.model.path, c.data.files, c.train.steps = model, (data,), 3
        c.lora.dropout = dropout  # the masks must not depend on the mesh either
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = shape[:3]
        c.train.grad_cache_chunk = shape[3] if len(shape) > 3 else 0
        trainer = Trainer(c, f"{out}/run-{'x'.join(map(str, shape))}")
        history = trainer.run(progress=False)
        kernel = trainer.frozen["layers"][0]["mlp"]["up_proj"]["kernel"][...]
        lora_a = trainer.lora["layers"][0]["mlp"]["up_proj"]["kernel_lora_a"][...]
        results["x".join(map(str, shape))] = {
            "losses": [h["loss"] for h in history],
            "lora": [np.asarray(x).tolist() for x in jax.tree.leaves(trainer.lora)],
            "kernel_spec": [str(s) for s in kernel.sharding.spec],
            "kernel_shards": len({str(s.index) for s in kernel.addressable_shards}),
            "lora_a_spec": [str(s) for s in lora_a.sharding.spec],
        }
    json.dump(results, open(f"{out}/results.json", "w"))
""")


def _run(code, *args, devices, compilation_cache=None):
    """`code` in a fresh process on `devices` CPU devices; with JAX's persistent compilation cache in
    `compilation_cache` where given, so that a program compiled twice there is compiled once."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "PYTEST"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    if compilation_cache:
        env.update(JAX_ENABLE_COMPILATION_CACHE="true", JAX_COMPILATION_CACHE_DIR=str(compilation_cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                            timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    model, data = tiny_setup(root)
    _run(TRAIN, model, data, root / "one", json.dumps([(1, 1, 1), (1, 1, 1, 4)]), 0.1, devices=1)
    _run(TRAIN, model, data, root / "eight", json.dumps([*MESHES, GRAD_CACHE]), 0.1, devices=8)
    ones = json.loads((root / "one" / "results.json").read_text())
    eight = json.loads((root / "eight" / "results.json").read_text())
    eight["grad cache, one device"] = ones["1x1x1x4"]
    return ones["1x1x1"], eight, root


@pytest.mark.parametrize("shape", MESHES)
def test_mesh_step_equals_one_device(trained, shape):
    one, eight, _ = trained
    got = eight["x".join(map(str, shape))]
    np.testing.assert_allclose(got["losses"], one["losses"], rtol=1e-5)
    # Three Adam steps: Adam divides by sqrt(v), so float32 reordering in a near-zero gradient entry can move
    # that entry by ~lr * 1e-2; 1.1e-5 was measured on (2, 4, 1). Parameters are ~0.1 in size.
    for a, b in zip(got["lora"], one["lora"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=0)


def test_grad_cache_on_a_mesh_equals_one_device(trained):
    """GradCache's chunks take every n-th row, so that each batch shard gives each chunk its share:
    on a mesh, with dropout, the losses and adapters are the one-device GradCache run's."""
    plain, eight, _ = trained
    got, one = eight["x".join(map(str, GRAD_CACHE))], eight["grad cache, one device"]
    np.testing.assert_allclose(got["losses"], one["losses"], rtol=1e-5)
    assert np.abs(np.subtract(got["losses"], plain["losses"])).max() > 1e-4  # its chunks draw their own masks
    for a, b in zip(got["lora"], one["lora"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=0)


@pytest.mark.parametrize("shape", MESHES)
def test_parameters_are_sharded(trained, shape):
    got = trained[1]["x".join(map(str, shape))]
    data, fsdp, tensor = shape
    if fsdp == 1 and tensor == 1:
        assert got["kernel_shards"] == 1  # pure data parallelism: replicated weights
    else:
        assert got["kernel_shards"] == fsdp * tensor
    assert [s if s in ("fsdp", "tensor") else "None" for s in got["kernel_spec"]] == ["fsdp", "tensor"]
    assert got["lora_a_spec"][0] == "fsdp"  # adapters follow their base kernel's input axis


MULTIHOST = textwrap.dedent("""
    import json, sys
    import jax
    process, port, model, data, out, texts = sys.argv[1:]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=int(process))
    import importlib.util
    from diffemb_jax.training.trainer import Trainer
    spec = importlib.util.spec_from_file_location("tiny_cfg", "configs/tiny.py")
    tiny_cfg = importlib.util.module_from_spec(spec); spec.loader.exec_module(tiny_cfg)
    c = tiny_cfg.get_config()
    c.model.path, c.data.files, c.train.steps, c.lora.dropout = model, (data,), 3, 0.0
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 1, 1
    c.train.profile_from, c.train.profile_steps = 2, 1
    trainer = Trainer(c, out)
    history = trainer.run(progress=False)
    from jax.experimental import multihost_utils
    import numpy as np
    from diffemb_jax.embedding.embedder import Embedder
    multihost_utils.sync_global_devices("the lead wrote the adapter")
    embedder = Embedder.from_pretrained(model, adapter=f"{out}/adapter", mesh=trainer.mesh, batch_size=4)
    vectors = embedder.encode(json.loads(texts), progress=False)
    if jax.process_index() == 0:
        json.dump([h["loss"] for h in history], open(f"{out}/losses.json", "w"))
        np.save(f"{out}/vectors.npy", vectors)
""")


def test_two_processes_train_and_encode_as_one_device(trained, tmp_path):
    """Multi-host: two processes of one CPU device each, through JAX's distributed runtime. Each
    reads and packs its half of every step (they agree on row length and count), and they give the
    one-device losses and the same PEFT adapter, which the lead writes; both then encode with it as
    one device does. Each profiles step 2 into its own folder. Without dropout: its masks follow rows, and each host packs its own rows."""
    import socket

    from safetensors.numpy import load_file

    import tiny
    from diffemb_jax.embedding.embedder import Embedder

    _, _, root = trained
    _run(TRAIN, root / "model", root / "train.jsonl", tmp_path / "one", json.dumps([(1, 1, 1)]), 0.0, devices=1)
    one = json.loads((tmp_path / "one" / "results.json").read_text())["1x1x1"]
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "PYTEST"))}
    env.update(JAX_PLATFORMS="cpu")
    out = tmp_path / "run"
    texts = [" ".join(tiny.WORDS[i : i + 1 + i % 7]) for i in range(11)]
    processes = [subprocess.Popen([sys.executable, "-c", MULTIHOST, str(i), str(port), str(root / "model"),
                                   str(root / "train.jsonl"), str(out), json.dumps(texts)], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in processes:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
    np.testing.assert_allclose(json.loads((out / "losses.json").read_text()), one["losses"], rtol=1e-5)
    for i in range(2):  # step 2 profiled by each process into a folder of its own (one host name here)
        assert len(list((out / "profile" / f"process-{i}").glob("plugins/profile/*/*.xplane.pb"))) == 1
    ours = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    alone = load_file(str(tmp_path / "one" / "run-1x1x1" / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == alone.keys() and len(ours) == 2 * 7 * 2
    for name in ours:
        np.testing.assert_allclose(ours[name], alone[name], atol=5e-5, rtol=0, err_msg=name)
    # and encode with it across both processes as one device does
    one_device = Embedder.from_pretrained(root / "model", adapter=out / "adapter", batch_size=4)
    np.testing.assert_allclose(np.load(out / "vectors.npy"), one_device.encode(texts, progress=False), atol=1e-5)


def test_mesh_shape_resolves_the_rest():
    assert parallel.mesh_shape(-1, 2, 2, device_count=8) == (2, 2, 2)
    assert parallel.mesh_shape(1, -1, 2, device_count=8) == (1, 4, 2)
    with pytest.raises(ValueError, match="at most one axis"):
        parallel.mesh_shape(-1, -1, 1, device_count=8)
    with pytest.raises(ValueError, match="needs 6 devices; there are 8"):
        parallel.mesh_shape(3, 2, 1, device_count=8)


PLAN = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "tests")
    import importlib.util
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from diffemb_jax import parallel
    from diffemb_jax.batching import STEP_KEYS, padded_rows
    from diffemb_jax.training.plan import memory_plan, step_state
    from diffemb_jax.training.trainer import Trainer, row_bounds
    spec = importlib.util.spec_from_file_location("tiny_cfg", "configs/tiny.py")
    tiny_cfg = importlib.util.module_from_spec(spec); spec.loader.exec_module(tiny_cfg)
    model, data, out = sys.argv[1:4]
    plans = {}
    for fsdp in (1, 2, 4, 8):
        c = tiny_cfg.get_config()
        c.model.path, c.data.files = model, (data,)
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 8 // fsdp, fsdp, 1
        plans[fsdp] = memory_plan(c)
    # The plan's abstract arrays sit where a real Trainer (weights loaded, apply_lora's adapters) puts them, and
    # its compiled step is the Trainer's own at the same batch.
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    trainer = Trainer(c, f"{out}/run")
    _, lora, frozen = step_state(c, trainer.mesh)
    def placed(state):
        return {p: (v.shape, str(v.dtype), v.sharding.spec) for p, v in nnx.to_flat_state(state)}
    def differ(a, b):
        return sorted(str(p) for p in set(a) | set(b) if a.get(p) != b.get(p))
    multiple, most = row_bounds(c, trainer.mesh)
    rows = jax.ShapeDtypeStruct((padded_rows(most, multiple, most), 24), jnp.int32,
                                sharding=parallel.batch_sharding(trainer.mesh))
    stats = trainer.train_step.lower(trainer.lora, trainer.opt_state, trainer.frozen, 0,
                                     dict.fromkeys(STEP_KEYS, rows)).compile().memory_analysis()
    json.dump({"plans": plans, "plan_222": memory_plan(c),
               "lora_differs": differ(placed(lora), placed(trainer.lora)),
               "frozen_differs": differ(placed(frozen), placed(trainer.frozen)),
               "lora_specs": sorted({str(v[2]) for v in placed(trainer.lora).values()}),
               "trainer": {"arguments": stats.argument_size_in_bytes, "temporaries": stats.temp_size_in_bytes}},
              open(f"{out}/plans.json", "w"))
""")


def test_compiled_memory_falls_with_fsdp(tmp_path):
    model, data = tiny_setup(tmp_path)
    # memory_plan at (2, 2, 2) and the Trainer lower the same step: with the cache on it compiles once
    _run(PLAN, model, data, tmp_path, devices=8, compilation_cache=tmp_path / "xla")
    result = json.loads((tmp_path / "plans.json").read_text())
    assert result["lora_differs"] == [] and result["frozen_differs"] == []
    assert len(result["lora_specs"]) > 1  # the adapters are not all replicated: the comparison has teeth
    assert {k: result["plan_222"][k] for k in result["trainer"]} == result["trainer"]
    plans = {int(k): v for k, v in result["plans"].items()}
    for n in (2, 4, 8):
        # about 1/n: the embedding (vocab 97) shards by its embed axis; norm scales and q/k/v biases stay whole
        assert plans[n]["frozen_params"] == pytest.approx(plans[1]["frozen_params"] / n, rel=0.1)
        # XLA's own count of the step's argument bytes (parameters, optimizer state, batch) falls too
        assert plans[n]["arguments"] < plans[n // 2]["arguments"]
        assert plans[n]["optimizer_state"] < plans[n // 2]["optimizer_state"]  # moments sharded like adapters
    assert plans[8]["arguments"] < 0.4 * plans[1]["arguments"]


ENCODE = textwrap.dedent("""
    import sys
    import numpy as np
    from diffemb_jax import parallel
    from diffemb_jax.embedding import Embedder
    model, out = sys.argv[1:3]
    texts = [" ".join(["the cat plays music"] * (i % 7 + 1)) + f" {i}" for i in range(37)]
    mesh = parallel.make_mesh(4, 1, 2)
    embedder = Embedder.from_pretrained(model, mesh=mesh, batch_size=8, max_length=64)
    kernel = embedder.model.layers[0].mlp.up_proj.kernel[...]
    assert len({str(s.index) for s in kernel.addressable_shards}) == 2  # sharded over tensor
    np.save(out, embedder.encode(texts, progress=False))
""")


def test_encoding_on_a_mesh_equals_one_device(tmp_path):
    import tiny
    from diffemb_jax.embedding import Embedder

    model = tiny.write_checkpoint("qwen2", tmp_path / "model")
    _run(ENCODE, model, tmp_path / "mesh.npy", devices=8)
    texts = [" ".join(["the cat plays music"] * (i % 7 + 1)) + f" {i}" for i in range(37)]
    want = Embedder.from_pretrained(model, batch_size=8, max_length=64).encode(texts, progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "mesh.npy"), want, atol=1e-5)
