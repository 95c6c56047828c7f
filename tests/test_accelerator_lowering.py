"""The encode and LoRA train step lower for the accelerators, from this CPU: jax.export compiles
nothing, but lowering runs every kernel's own checks and the lowering rules of the target platform
(Pallas splash to a Mosaic TPU call, not the interpret mode the other tests run; cuDNN flash
attention to XLA's fused-attention calls, forward and backward). CI has neither device; this is
what it can know of their paths before a run there."""

import functools
import re

import jax
import jax._src.cudnn.fused_attention_stablehlo as cudnn_attention
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffemb_jax.batching import SIDES, pack_step, packs, pad_rows, padded_rows, row_length, texts_per_row
from diffemb_jax.embedding.pooling import pool
from diffemb_jax.model import Decoder, ForwardOptions
from diffemb_jax.model.config import ModelConfig
from diffemb_jax.model.lora import LoraConfig, apply_lora
from diffemb_jax.training.step import StepConfig, make_optimizer, make_train_step, split_model

LAYERS = 2
# Real head width (128, the 7B shapes'), grouped heads, q/k/v bias: the kernels' constraints bind here.
CONFIG = ModelConfig(model_type="qwen2", vocab_size=128, hidden_size=256, num_layers=LAYERS, num_heads=2,
                     num_kv_heads=1, head_dim=128, intermediate_size=256, rope_theta=1e6, qkv_bias=True)
BATCH, LENGTH = 2, 200  # not a multiple of splash's 128-token blocks: the padding path lowers too
# (platform, jax backend name, kernel) -> the custom call the kernel lowers to
KERNEL_CALLS = {"cudnn": ("cuda", "gpu", ["__cudnn$fmha", "SoftmaxBackward("]),
                "splash": ("tpu", "tpu", ["tpu_custom_call"])}
# No serialisation promise is needed: we only read the text.
CUDNN_CALLS = [jax.export.DisabledSafetyCheck.custom_call(f"__cudnn$fmha{name}") for name in
               ("Softmax", "SoftmaxBackward", "ScaleBiasSoftmax", "ScaleBiasSoftmaxBackward")]


@pytest.fixture
def on_device(monkeypatch):
    """Trace as on `backend`: the kernels ask jax.default_backend(); cuDNN's checks ask the GPU's
    cuDNN version and compute capability (by default an H100's, 9.0, with cuDNN 9.10; 8.0: an A100)."""
    def as_backend(backend, capability="9.0"):
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        if backend == "gpu":
            monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda: 91000)
            monkeypatch.setattr(cudnn_attention, "check_compute_capability", lambda wanted: wanted <= capability)
            monkeypatch.setattr(cudnn_attention, "is_cuda_compute_capability_equal", lambda wanted: wanted == capability)
    return as_backend


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _tokens():
    return jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32)


def _model():
    return Decoder(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)


def _calls(text: str, names: list[str]) -> list[int]:
    return [text.count(name) for name in names]


@pytest.mark.parametrize("kernel", ["cudnn", "splash"])
@pytest.mark.parametrize("packed", [False, True])
def test_encode_lowers_to_the_kernel(kernel, packed, on_device):
    """Rows of one text, or packed with several: cuDNN then takes each row's texts as runs (its packed
    layout, max_seg_per_batch > 1), no mask, no L x L tensor."""
    platform, backend, names = KERNEL_CALLS[kernel]
    graphdef, state = nnx.split(_model())

    def encode(state, ids, segments):
        texts = 4 if packed else 1
        hidden = nnx.merge(graphdef, state)(ids, segments, ForwardOptions(kernel=kernel), texts_per_row=texts)
        return pool(hidden, segments, segments, texts_per_row=texts if packed else None)

    on_device(backend)
    exported = jax.export.export(jax.jit(encode), platforms=[platform], disabled_checks=CUDNN_CALLS)(
        _abstract(state), _tokens(), _tokens())
    text = exported.mlir_module()
    assert _calls(text, names)[0] > 0  # the kernel, not a fallback to xla
    if kernel == "cudnn":
        assert "__cudnn$fmhaScaleBiasSoftmax(" not in text and _square_tensors(text, LENGTH) == []
        assert ('\\22max_seg_per_batch\\22: 5' in text) == packed, re.findall(r"max_seg_per_batch[^,]*", text)


@pytest.mark.parametrize("kernel,remat,packed", [("cudnn", "none", True), ("cudnn", "full", True),
                                                 ("cudnn", "none", False), ("splash", "dots", True)])
def test_lora_train_step_lowers_to_the_kernel(kernel, remat, packed, on_device):
    """The whole step: LoRA with dropout (threefry), our custom backward, remat, the loss, optax.
    cuDNN takes packed rows' texts as runs, forward and backward; one text a row, its lengths: no mask."""
    platform, backend, names = KERNEL_CALLS[kernel]
    model = apply_lora(_model(), LoraConfig(rank=4, alpha=8, dropout=0.1))
    graphdef, lora, frozen = split_model(model)
    tx, schedule = make_optimizer(1e-4, warmup_steps=0, total_steps=10, grad_clip=1.0, weight_decay=0.0)
    step = make_train_step(graphdef, tx, schedule, StepConfig(batch_size=2, loss="in_batch", scale=50, seed=0,
                                                           packed=packed,
                                                           forward=ForwardOptions(kernel=kernel, remat=remat)))
    batch = {key: _tokens() for key in ("input_ids", "segments", "embed_mask")}  # packed rows

    on_device(backend)
    exported = jax.export.export(step, platforms=[platform], disabled_checks=CUDNN_CALLS)(
        _abstract(lora), _abstract(tx.init(lora)), _abstract(frozen), jax.ShapeDtypeStruct((), jnp.int32), batch)
    text = exported.mlir_module()
    counts = _calls(text, names)
    assert all(count > 0 for count in counts), counts  # forward (and cuDNN's backward) on the kernel
    assert "threefry2x32" in text  # the adapters' dropout masks are in the step
    if kernel == "cudnn":
        assert "__cudnn$fmhaScaleBiasSoftmaxBackward(" not in text and _square_tensors(text, LENGTH) == []
    # Every product with a base weight, forward and backward, in bfloat16 (the float32 adapters'
    # products are rank-wide): one in float32 would run at a fraction of the GPU's bf16 rate.
    weights = {f"{a}x{b}x" for a in (128, 256) for b in (128, 256)}
    with_weights = [types for types in _dot_operand_types(text) if any(t[:8] in weights for t in types)]
    assert with_weights and all(t.endswith("bf16") for types in with_weights for t in types), with_weights


def _dot_operand_types(text: str) -> list[list[str]]:
    """The operand types of each dot_general in a StableHLO module, as 'AxBxdtype'."""
    return [re.findall(r"tensor<([^>]*)>", line.split(" : ")[-1])[:2]
            for line in text.splitlines() if "stablehlo.dot_general" in line]


def _sides(lengths: dict[str, list[int]], width: int) -> dict:
    """A step's sides as the data pipeline gives them: texts of the given token counts, right-padded."""
    sides = {}
    for side, counts in lengths.items():
        mask = (np.arange(width)[None, :] < np.asarray(counts)[:, None]).astype(np.int32)
        sides[side] = {"input_ids": mask * 7, "padding_mask": mask, "embed_mask": mask}
    return sides


def _square_tensors(text: str, length: int) -> list[str]:
    """The [..., length, length] tensor types in a StableHLO module: the texts' mask and its gradient."""
    return re.findall(rf"tensor<(?:\d+x)*{length}x{length}x\w+>", text)


@pytest.mark.parametrize("capability", ["9.0", "8.0"])
@pytest.mark.parametrize("tokens,packed", [(150, False), (12, True)])
def test_cudnn_step_takes_no_mask_on_hopper_and_one_where_packing_saves_rows_before(tokens, packed, capability,
                                                                                  on_device):
    """Texts over half a row leave a row for each: the step goes one text a row (batching.packs, as the
    trainer lays it), and cuDNN takes each row's length. Short texts share rows: on a Hopper GPU cuDNN
    takes each row's texts as runs, and the lowered step holds no L x L tensor either way; before Hopper
    (no packed layout) the texts' mask goes as a [rows, 1, L, L] bias a layer, and before jax 0.12 its
    gradient comes back from cuDNN's backward too (README: GPU)."""
    sides = _sides({side: [tokens] * 2 for side in SIDES}, LENGTH)  # 2 queries, a positive and a negative each
    length = row_length(sides)
    batch = pack_step(sides, global_batch_size=2, num_negatives=1)
    rows = padded_rows(len(batch["input_ids"]), 1, 6)
    assert packs(rows, 6) == packed
    if not packed:
        batch = pack_step(sides, global_batch_size=2, num_negatives=1, pack=False, length=length)
    batch = pad_rows(batch, rows)
    model = apply_lora(_model(), LoraConfig(rank=4, alpha=8, dropout=0.1))
    graphdef, lora, frozen = split_model(model)
    tx, schedule = make_optimizer(1e-4, warmup_steps=0, total_steps=10, grad_clip=1.0, weight_decay=0.0)
    step = make_train_step(graphdef, tx, schedule, StepConfig(batch_size=2, forward=ForwardOptions(kernel="cudnn")))

    on_device("gpu", capability)
    layout = {"packed": packed, "texts_per_row": texts_per_row(batch["segments"])} if packed else {"packed": False}
    exported = jax.export.export(jax.jit(functools.partial(step, **layout)), platforms=["cuda"],
                                 disabled_checks=CUDNN_CALLS)(
        _abstract(lora), _abstract(tx.init(lora)), _abstract(frozen), jax.ShapeDtypeStruct((), jnp.int32),
        _abstract(batch))
    text = exported.mlir_module()
    bias = packed and capability < "9.0"
    assert text.count("__cudnn$fmhaScaleBiasSoftmaxBackward(" if bias else "__cudnn$fmhaSoftmaxBackward(") > 0
    square = _square_tensors(text, length)
    if not bias:
        assert square == [], square
        return
    assert f"tensor<{rows}x1x{length}x{length}xbf16>" in square, square
    results = [line.split("->")[-1] for line in text.splitlines() if "fmhaScaleBiasSoftmaxBackward" in line]
    dbias = f"tensor<{rows}x1x{length}x{length}xbf16>"
    assert results and all((dbias in r) == (jax.__version_info__ < (0, 12)) for r in results), results
