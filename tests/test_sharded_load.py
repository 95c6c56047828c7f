"""Streaming load into parameters that are already sharded over a mesh: each device's slice is read
from the checkpoint (transposed kernels included) and the model computes what the one-device model
computes. Runs in a subprocess with 4 simulated CPU devices."""

import subprocess
import sys
import textwrap

import tiny

SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from diffemb_jax.checkpoints import load_model

    assert len(jax.devices()) == 4
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("fsdp", "tensor"))
    rules = {"embed": "fsdp", "q_heads": "tensor", "kv_heads": "tensor", "mlp": "tensor"}  # vocab 97 does not divide

    def sharding_for(path, axes, shape):
        return NamedSharding(mesh, P(*[rules.get(a) for a in axes]))

    one, _ = load_model(sys.argv[1], progress=False)
    many, _ = load_model(sys.argv[1], progress=False, sharding_for=sharding_for)
    kernel = many.layers[0].mlp.gate_proj.kernel[...]
    assert kernel.sharding.spec == P("fsdp", "tensor"), kernel.sharding
    assert len({str(s.index) for s in kernel.addressable_shards}) == 4  # four distinct slices
    for a, b in zip(jax.tree.leaves(__import__("flax").nnx.state(one)), jax.tree.leaves(__import__("flax").nnx.state(many))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = jnp.arange(1, 17).reshape(2, 8) % 90
    mask = jnp.ones((2, 8), jnp.int32)
    np.testing.assert_allclose(np.asarray(many(ids, mask)), np.asarray(one(ids, mask)), atol=1e-5)
    print("OK")
""")


def test_load_streams_into_sharded_parameters(tmp_path):
    directory = tiny.write_checkpoint("qwen2", tmp_path / "hf")
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(directory)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")
