"""The L x L tensors and softmax statistics at cuDNN's calls in a LoRA train step lowered for CUDA from
this CPU (README: GPU).

A measurement, not a test: XLA:CPU cannot compile cuDNN's calls, so a step's memory on the GPU is not
known here; what the lowered program asks of cuDNN is. It lives beside test_accelerator_lowering.py
because it needs the same stand-ins for a GPU (the backend name, cuDNN's version and a compute
capability: 9.0, an H100's, by default; 8.0 for an A100, which has no packed layout), which only tests
and this tool may set. Layers and heads at Dream-7B's (28 layers, 28 heads of 128, 4 KV heads), widths
small: neither the [rows, 1, L, L] tensors nor the statistics depend on the width.

    PYTHONPATH=. python tests/lower_packed_step.py ROWS LENGTH LAYERS REMAT packed|alone [--texts-per-row N] [--capability 8.0]
"""

import argparse
import collections
import re
import sys
from pathlib import Path

import jax
import jax._src.cudnn.fused_attention_stablehlo as cudnn_attention
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from test_accelerator_lowering import CUDNN_CALLS, _abstract  # noqa: E402

from diffemb_jax.model import Decoder, ForwardOptions  # noqa: E402
from diffemb_jax.model.config import ModelConfig  # noqa: E402
from diffemb_jax.model.lora import LoraConfig, apply_lora  # noqa: E402
from diffemb_jax.training.step import StepConfig, make_optimizer, make_train_step, split_model  # noqa: E402

BYTES = {"bf16": 2, "f16": 2, "f32": 4, "i1": 1}


def lowered_step(rows: int, length: int, layers: int, remat: str, packed: bool, texts_per_row: int = 8,
                 capability: str = "9.0") -> str:
    cfg = ModelConfig(model_type="qwen2", vocab_size=128, hidden_size=256, num_layers=layers, num_heads=28,
                      num_kv_heads=4, head_dim=128, intermediate_size=256, rope_theta=1e6, qkv_bias=True)
    model = Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    graphdef, lora, frozen = split_model(apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.05)))
    tx, schedule = make_optimizer(1e-4, warmup_steps=0, total_steps=10)
    # The recipe's 48 texts a step (16 queries, a positive and a negative each) in `rows` rows
    step = make_train_step(graphdef, tx, schedule, StepConfig(
        batch_size=16, packed=packed, texts_per_row=texts_per_row, forward=ForwardOptions(kernel="cudnn", remat=remat)))
    batch = {key: jax.ShapeDtypeStruct((rows, length), jnp.int32) for key in ("input_ids", "segments", "embed_mask")}
    jax.default_backend = lambda: "gpu"
    cudnn_attention.check_cudnn_version = lambda: 91000
    cudnn_attention.check_compute_capability = lambda wanted: wanted <= capability
    cudnn_attention.is_cuda_compute_capability_equal = lambda wanted: wanted == capability
    exported = jax.export.export(step, platforms=["cuda"], disabled_checks=CUDNN_CALLS)(
        _abstract(lora), _abstract(tx.init(lora)), _abstract(frozen), jax.ShapeDtypeStruct((), jnp.int32), batch)
    return exported.mlir_module()


def square_tensors_at_cudnn(text: str, length: int) -> collections.Counter:
    """(call, operand|result, type) -> count, for the [..., length, length] tensors of cuDNN's calls and
    the float32 softmax statistics [sequences, heads, length] its forward calls return for the backward."""
    square = re.compile(rf"tensor<(?:\d+x)*{length}x{length}x\w+>|tensor<\d+x\d+x{length}xf32>")
    found = collections.Counter()
    for line in text.splitlines():
        call = re.search(r"__cudnn\$fmha\w+", line)
        if call and "custom_call" in line:
            operands, _, results = line.partition(" -> ")
            for where, part in (("operand", operands.split(" : ")[-1]), ("result", results)):
                for kind in square.findall(part):
                    found[(call.group(0), where, kind)] += 1
    return found


def size(kind: str) -> int:
    *dims, dtype = kind[len("tensor<"):-1].split("x")
    n = BYTES[dtype]
    for d in dims:
        n *= int(d)
    return n


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("rows", "length", "layers"):
        parser.add_argument(name, type=int)
    parser.add_argument("remat", choices=["none", "full", "dots"])
    parser.add_argument("layout", choices=["packed", "alone"])
    parser.add_argument("--texts-per-row", type=int, default=8, help="the most texts a packed row holds (the "
                        "trainer's power-of-two bound)")
    parser.add_argument("--capability", default="9.0", help="the GPU's compute capability (8.0: an A100)")
    args = parser.parse_args()
    found = square_tensors_at_cudnn(lowered_step(args.rows, args.length, args.layers, args.remat,
                                                 args.layout == "packed", args.texts_per_row, args.capability),
                                    args.length)
    for (call, where, kind), n in sorted(found.items()):
        print(f"{call} {where} {kind} x{n}: {n * size(kind) / 2**30:.2f} GiB")
    total = sum(n * size(kind) for (_, _, kind), n in found.items())
    print(f"{sum(found.values())} such tensors at cuDNN's calls, {total / 2**30:.2f} GiB as lowered "
          f"({total / args.layers / 2**30:.3f} GiB a layer)")


if __name__ == "__main__":
    main()
