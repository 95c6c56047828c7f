"""`diffemb bench encode|train|long`: is JAX faster, and lighter, than the PyTorch reference?

encode: both frameworks embed the same texts (standard-library docstrings, cut to at most
--max-length tokens) with the same weights, tokens, batch size and bucket lengths, bidirectional
attention and mean pooling; each framework encodes them all once untimed (warm-up: JAX compiles
every batch shape there), then once timed. JAX packs texts of at most --pack-length tokens several
to a row (the Embedder's default); PyTorch, the reference, runs one text a row, and so does JAX with
--pack-length 0: the same batches, padding included.

train: both frameworks run the same contrastive LoRA train step on the same token ids: --queries
queries (a docstring's first sentence, at most --query-length tokens), their positives (the
docstring) and hard negatives (the next docstring, most often of the same module), documents at
most --doc-length tokens. PyTorch, as llm2vec does, pads each side to its longest text; JAX runs the
train step's own layout, every text packed into rows as long as the bucket of the longest
(training/packing.py; "tokens computed" counts both). Bidirectional attention, mean pooling,
in-batch InfoNCE over [positives; negatives] (cosine x 50), LoRA r=--lora-rank, alpha=2r, dropout
--lora-dropout (0.05) on q,k,v,o,gate,up,down, AdamW (weight decay 0, the HF linear schedule from lr to 0 over all
the steps run) after clipping gradients to norm 1. JAX runs the project's own train step (qwix
LoRA), compiled ahead of time (compile s); PyTorch runs transformers + peft. --warmup-steps steps
are timed apart from the --steps timed ones. LoRA B starts at zero, so the first step's loss is the
base model's in every run and must agree; after that the two frameworks draw different LoRA A
initialisations and dropout masks, so losses only stay close.

--grad-cache-chunk N runs JAX's GradCache step (training/step.py) with N packed rows a chunk: the
plain step's loss and gradients for one more forward pass, with one chunk's activations live at a
time; PyTorch runs its plain step.

--remat picks what JAX keeps for the backward pass (the decoder's REMAT_POLICIES: none, full =
nothing saved, dots = projection outputs saved, dots_all = attention's matmuls too), or compares a
comma-separated list of them (all: every one): one JAX run per policy. PyTorch runs once per
checkpointing setting those need: off for none, on (transformers' gradient checkpointing, as the
recipe does) for any other; each policy's tokens/s ratio is against its match. The summary names the
fastest policy and the one of lowest peak memory (device memory on an accelerator, else the timed
steps' peak RSS), also in the report's best_remat.

long: one document at each of --lengths tokens (default 1024 ... 32768, the LongEmbed Passkey and
Needle lengths), batch 1, each length in a child process of its own (so its peak memory is its
own), shortest first: the largest length that fits and its time. A run that runs out of memory says
so, and the longer ones of that framework are not tried; nor is a length whose time (or, on the CPU,
whose peak RSS against the memory available) would pass --time-limit seconds, predicted from the two
lengths before it with growth at most quadratic in length. `long --compile-only` answers the same
question in seconds: JAX alone compiles the encoder from the shape (--shape's, or --model's config;
no weights made or read, nothing run) and reports XLA's memory analysis a length (long_plan).

--model benches a checkpoint; --shape a named model shape (SHAPES) at random weights, seeded, written
once to the cache ($DIFFEMB_CACHE, else ~/.cache/diffemb-jax, under bench/) and reused, with the
bundled SmolLM2 tokenizer or --tokenizer.

Both report model TFLOP/s: matrix-product FLOPs of the useful work (formulas in FORWARD_FORMULA and
TRAIN_FORMULA, padding not counted) over the timed seconds, and MFU against --peak-tflops, or against
the known peak of the device each ran on (KNOWN_PEAK_TFLOPS); on CPU no peak is assumed.

Devices: JAX runs on its default device; the PyTorch side on CUDA where torch sees a GPU (--dtype
bfloat16 loads bf16 weights there), else on the CPU. A summary line warns when one ran on the CPU and
the other did not.

--mesh DATA,FSDP,TENSOR (encode, train): JAX runs on a mesh of every device, as training and the
Embedder place things on one (rows over data x fsdp, weights by their logical axes), instead of on
one device; PyTorch stays on one, so the ratios are also given per device, and MFU counts the
mesh's devices.

--profile DIR: after its timed part, each run profiles one more pass (encode: the texts; train: one
step; long: the document) into DIR/<run label>: JAX an XProf trace (`xprof --logdir DIR/<run>`, or
perfetto_trace.json.gz in ui.perfetto.dev), PyTorch a Chrome trace (trace.json) and its operators'
totals (operators.txt). The timed figures are never the profiler's.

--no-vs-torch runs JAX alone: no ratios, and no torch or peft needed but to write --shape's weights.

Each run (a framework; for train, with its remat setting) is a child process of its own, one after
the other, so the peak memory reported is that run's alone. RSS figures read /proc, so they are
Linux-only. On an accelerator, peak device memory is the allocator's (JAX memory_stats, torch
max_memory_allocated), null on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.metadata
import inspect
import itertools
import json
import math
import os
import platform
import re
import shutil
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from diffemb_jax.memory import available_host_mb, compiled_bytes, device_capacity

# Modules whose public docstrings make the texts: real prose and code, from a line to pages long.
DOC_MODULES = ("json", "re", "textwrap", "itertools", "functools", "collections", "inspect", "pathlib",
               "subprocess", "threading", "argparse", "logging", "random", "statistics", "string",
               "tempfile", "zipfile", "tarfile", "csv", "datetime", "heapq", "bisect", "difflib",
               "email.message", "urllib.parse", "http.client", "socket", "typing", "asyncio", "unittest",
               "decimal", "fractions", "math", "os", "shutil")
FRAMEWORKS = {"jax": "JAX", "torch": "PyTorch"}
COMPARED = 4  # embeddings of the first texts sent back to compare the two frameworks
NONE = "–"  # a table cell with no figure

# The train step: the reference recipe (DESIGN.md) on both sides.
SIDES = ("query", "positive", "negative")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR = 1e-4
GRAD_CLIP = 1.0
SCALE = 50.0  # cosine x 50: temperature 0.02
SEED = 42
# Two runs' first losses (LoRA B = 0: the base model's loss) agree within this, by dtype: cosine x 50
# magnifies bf16's rounding (the default bench on SmolLM2: JAX 1.683, PyTorch 1.743; float32 1.756).
FIRST_LOSS_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1}


# ----------------------------------------------------------------------------- texts


def docstrings() -> list[str]:
    """Distinct docstrings of DOC_MODULES' public functions and classes, in a fixed order."""
    docs = {}
    for module_name in DOC_MODULES:
        module = importlib.import_module(module_name)
        for name, obj in sorted(vars(module).items()):
            if not name.startswith("_") and (inspect.isroutine(obj) or inspect.isclass(obj)):
                doc = inspect.getdoc(obj)
                if doc and doc.strip():
                    docs.setdefault(doc.strip(), None)
    return list(docs)


def fit(tokenizer, text: str, max_length: int) -> str:
    """`text` cut at a token boundary so that it tokenizes to at most max_length tokens."""
    keep = max_length
    while text and len((enc := tokenizer.encode(text)).ids) > max_length:
        text = text[: max((end for _, end in enc.offsets[:keep]), default=0)].rstrip()
        keep -= 1
    return text


def make_texts(tokenizer, n: int, max_length: int) -> list[str]:
    texts = list(itertools.islice(filter(None, (fit(tokenizer, doc, max_length) for doc in docstrings())), n))
    if len(texts) < n:
        raise ValueError(f"--texts {n}: there are only {len(texts)} distinct texts to bench with")
    return texts


def token_count(tokenizer, texts: list[str], max_length: int) -> int:
    return sum(min(len(enc.ids), max_length) for enc in tokenizer.encode_batch(texts))


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    return re.split(r"(?<=[.!?])\s", paragraph, maxsplit=1)[0]


def make_triples(n: int) -> list[tuple[str, str, str]]:
    """(query, positive, hard negative): a docstring's first sentence, the docstring, and the next
    docstring (most often of the same module)."""
    docs = docstrings()
    if len(docs) < 2 * n:
        raise ValueError(f"--queries {n}: there are only {len(docs)} distinct texts, enough for "
                         f"{len(docs) // 2} (query, positive, negative) triples")
    return [(first_sentence(docs[2 * i]), docs[2 * i], docs[2 * i + 1]) for i in range(n)]


def padded(tokenizer, texts: list[str], length: int) -> dict[str, list[list[int]]]:
    """Token ids cut to `length` and right-padded to the longest of them (as llm2vec's batches are),
    with their 0/1 padding mask (JSON lists)."""
    rows = [enc.ids[:length] for enc in tokenizer.encode_batch(texts)]
    longest = max(map(len, rows))
    return {"input_ids": [row + [0] * (longest - len(row)) for row in rows],
            "padding_mask": [[1] * len(row) + [0] * (longest - len(row)) for row in rows]}


def packed_step(batch: dict, length: int, shards: int = 1) -> dict[str, list[list[int]]]:
    """The train step's layout of `batch` (training/packing.py), texts of at most `length` tokens:
    packed into rows as long as the bucket of the longest, every token embedded, the row count
    rounded as the trainer rounds it for `shards` batch shards."""
    import numpy as np

    from diffemb_jax.training.packing import pack_step, pad_rows, step_rows

    sides = {}
    for side in SIDES:
        mask = np.asarray(batch[side]["padding_mask"], np.int32)
        ids = np.pad(np.asarray(batch[side]["input_ids"], np.int32), ((0, 0), (0, length - mask.shape[1])))
        mask = np.pad(mask, ((0, 0), (0, length - mask.shape[1])))
        sides[side] = {"input_ids": ids, "padding_mask": mask, "embed_mask": mask}
    queries = len(batch["query"]["input_ids"])
    rows = pack_step(sides, global_batch_size=queries, num_negatives=len(batch["negative"]["input_ids"]) // queries)
    rows = pad_rows(rows, step_rows(len(rows["input_ids"]), shards, queries * len(SIDES)))
    return {key: value.tolist() for key, value in rows.items()}


# ----------------------------------------------------------------------------- models


def tokenizer_for(model: Path):
    """The tokenizer that load_model gives the Embedder, without reading any weights."""
    from diffemb_jax.checkpoints.checkpoint import hf_tokenizer

    return hf_tokenizer(model.parent, model.name) if model.suffix == ".gguf" else hf_tokenizer(model)


def torch_source(model: Path) -> Path:
    """The weights transformers can load: the model itself, or what a converted directory came from."""
    from diffemb_jax.checkpoints import is_converted
    from diffemb_jax.checkpoints.checkpoint import CONVERTED_MARKER

    if not is_converted(model):
        return model
    source = json.loads((model / CONVERTED_MARKER).read_text()).get("source", "")
    if not source or not Path(source).exists():
        raise FileNotFoundError(f"{model} was converted from {source!r}, which is gone; the PyTorch reference "
                                "needs those original weights: pass the HF directory or .gguf as --model")
    return Path(source)


# ----------------------------------------------------------------------------- model FLOPs

# Matrix products only (2 FLOPs per multiply-add), of the useful work: each text at its own length n,
# padding not counted, though both frameworks compute on it (so this is model FLOPs, as in MFU).
FORWARD_FORMULA = ("forward, per text of n tokens: n x L x (2 x P + 2 x r x S) + 4 x L x n^2 x H x hd, "
                   "L layers, P = sum over a block's 7 projections of d_in x d_out, S = sum of d_in + d_out (LoRA "
                   "x @ A @ B, r = 0 without LoRA), H x hd = query width (QK^T and PV over n keys)")
TRAIN_FORMULA = ("train = forward + backward; backward: n x L x (2 x P + 4 x r x S) + 8 x L x n^2 x H x hd "
                 "- n x (2 x Pqkv + 2 x r x 3d): input gradients through the frozen base (no weight "
                 "gradients), dQ dK dV dP of attention, dA dB and input gradient of each adapter; the "
                 "first block's q, k, v take no input gradient (the embeddings are frozen)")


def _projections(cfg: dict) -> list[tuple[int, int]]:
    """(d_in, d_out) of a block's q, k, v, o, gate, up, down projections."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_heads"] * cfg["head_dim"], cfg["num_kv_heads"] * cfg["head_dim"]
    return [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]


def forward_flops(cfg: dict, n: int, rank: int = 0) -> int:
    """Model FLOPs of one forward pass over a text of n tokens (FORWARD_FORMULA); cfg: a ModelConfig as a dict."""
    proj = _projections(cfg)
    p, s = sum(i * o for i, o in proj), sum(i + o for i, o in proj)
    width = cfg["num_heads"] * cfg["head_dim"]
    return cfg["num_layers"] * (n * (2 * p + 2 * rank * s) + 4 * n * n * width)


def train_flops(cfg: dict, n: int, rank: int) -> int:
    """Model FLOPs of forward and backward of the LoRA train step for a text of n tokens (TRAIN_FORMULA)."""
    proj = _projections(cfg)
    p, s = sum(i * o for i, o in proj), sum(i + o for i, o in proj)
    width = cfg["num_heads"] * cfg["head_dim"]
    first_qkv = sum(i * o for i, o in proj[:3]) + rank * sum(i for i, _ in proj[:3])
    backward = cfg["num_layers"] * (n * (2 * p + 4 * rank * s) + 8 * n * n * width) - 2 * n * first_qkv
    return forward_flops(cfg, n, rank) + backward


# Dense peak TFLOP/s of accelerators the MFU is computed against without --peak-tflops (DESIGN.md).
KNOWN_PEAK_TFLOPS = {("H100", "bfloat16"): 989.0, ("H200", "bfloat16"): 989.0}


def peak_tflops(args_peak: float | None, device_kind: str, dtype: str) -> float | None:
    if args_peak is not None:
        return args_peak
    return next((v for (kind, dt), v in KNOWN_PEAK_TFLOPS.items() if kind in device_kind and dt == dtype), None)


# ----------------------------------------------------------------------------- named shapes

_7B_QWEN2 = ("qwen2", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                           intermediate_size=18944, vocab_size=152064, rope_theta=1e6, rms_norm_eps=1e-6))
# --shape: (transformers model type, config) of models benched at random weights. Dream and LLaDA
# compute as the Qwen2 and LLaMA of their shape (the bench runs bidirectional attention on all).
SHAPES = {
    "tiny": ("llama", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=49152, tie_word_embeddings=True)),
    "smollm2-135m": ("llama", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                   intermediate_size=1536, vocab_size=49152, rope_theta=1e5, rms_norm_eps=1e-5,
                                   tie_word_embeddings=True)),
    "dream-7b": _7B_QWEN2,
    "qwen2.5-7b": _7B_QWEN2,
    "llama3-8b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                intermediate_size=14336, vocab_size=128256, rope_theta=5e5, rms_norm_eps=1e-5)),
    "llada-8b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                               intermediate_size=12288, vocab_size=126464, rope_theta=5e5, rms_norm_eps=1e-5)),
}


LONGEST = 32768  # the longest LongEmbed context: what the named shapes must read
DEFAULT_SHAPE = "smollm2-135m"  # the bundled model's


def shape_tokenizer(path: str | Path | None, shape: str):
    """The tokenizer of a --shape run: --tokenizer (a tokenizer.json, a model directory or a .gguf),
    by default the bundled SmolLM2's; its ids must fit the shape's vocabulary."""
    import tokenizers

    from diffemb_jax import assets

    path = Path(path) if path is not None else assets.smollm2_gguf()
    if not path.exists():
        raise FileNotFoundError(f"--tokenizer {path} does not exist")
    tokenizer = tokenizers.Tokenizer.from_file(str(path)) if path.suffix == ".json" else tokenizer_for(path)
    vocab = SHAPES[shape][1]["vocab_size"]
    if tokenizer.get_vocab_size() > vocab:
        raise ValueError(f"the tokenizer {path} has {tokenizer.get_vocab_size()} ids, more than the "
                         f"{vocab} of shape {shape}: pass a --tokenizer whose ids fit")
    return tokenizer


def random_weights(shape: str, dtype: str) -> Path:
    """The transformers checkpoint (config and weights) of a named shape at random weights, seeded:
    written once to the cache and reused, since a 7B shape is 15 GB and minutes to write. Written
    beside its place and renamed into it when complete, so a cached one is never half-written."""
    import hashlib

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from diffemb_jax.cache import cache_dir

    model_type, fields = SHAPES[shape]
    recipe = json.dumps([model_type, fields, LONGEST, SEED, dtype], sort_keys=True)
    out = cache_dir() / "bench" / f"{shape}-{dtype}-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"writing random weights of shape {shape} ({dtype}) to {out}", flush=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        torch.manual_seed(SEED)
        config = AutoConfig.for_model(model_type, max_position_embeddings=LONGEST, **fields)
        AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).save_pretrained(partial)
        try:
            partial.rename(out)
        except OSError:
            if not out.is_dir():  # else another process cached it first
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # already gone after the rename
    return out


def random_checkpoint(shape: str, directory: Path, dtype: str, tokenizer) -> Path:
    """A checkpoint directory of a named shape at random weights (links to random_weights' files) and
    `tokenizer`. Both frameworks then load it as --model."""
    directory.mkdir(parents=True)
    for file in random_weights(shape, dtype).iterdir():
        (directory / file.name).symlink_to(file)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


# ----------------------------------------------------------------------------- workers (child processes)


def _proc_status_kb(field: str) -> int:
    """VmRSS / VmHWM of this process. Not ru_maxrss: a child's counts its parent's RSS before exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS mark (VmHWM); where that is refused the increase is an upper bound."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def device_peak_mb(framework: str) -> float | None:
    """This process's peak accelerator memory so far, in MB: what the allocator handed out (not the
    pool JAX preallocates, nor torch's cache), on its fullest device (a mesh has several). None on
    the CPU, where the RSS figures cover it."""
    if framework == "torch":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    import jax

    stats = [(device.memory_stats() or {}) if device.platform != "cpu" else {} for device in jax.local_devices()]
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    return max(peaks) / 2**20 if peaks else None


def _reset_device_peak(framework: str) -> bool:
    """Restart the peak-memory mark for the timed part, where one can: torch on CUDA (JAX has no reset)."""
    if framework == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return True
    return False


@functools.cache
def _jax_compilations() -> list[float]:
    """The seconds of each XLA compilation in this process from the first call on (jax.monitoring's
    event), so that a timed part can say it compiled nothing."""
    import jax.monitoring

    seen: list[float] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **_: seen.append(seconds) if event == "/jax/core/compile/backend_compile_duration" else None)
    return seen


def _measure(framework: str, warm_up: Callable, timed: Callable):
    """(figures, warm_up(), timed()): seconds of each, the peak RSS of the process so far (loading
    included), the peak RSS during the timed part alone, and how far that rose above the RSS the
    timed part started from (memory kept from warming up, say by an allocator, is not counted).
    On an accelerator, the same two peaks of device memory (the timed one where the framework can
    restart its mark; None otherwise). On a shared machine, cores_used (CPU seconds / wall seconds
    of the timed part) and the load average say how much of the machine the worker had. JAX's
    warmup_compiles and timed_compiles: the XLA compilations of each part, the timed one's 0 where
    warming up met every shape."""
    compilations = _jax_compilations() if framework == "jax" else None
    start = time.perf_counter()
    warm = warm_up()
    warmup_seconds = time.perf_counter() - start
    load_peak_kb, load_peak_device = _proc_status_kb("VmHWM"), device_peak_mb(framework)
    _reset_peak_rss()
    device_reset = _reset_device_peak(framework)
    rss_before_kb = _proc_status_kb("VmRSS")
    compiled_before = None if compilations is None else len(compilations)  # before the timed part
    start, cpu_start = time.perf_counter(), time.process_time()
    # Plain Python values or numpy: the work is done when it returns (.item(), .cpu(), float() and
    # np.asarray wait for the device), so no explicit synchronisation is needed.
    out = timed()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    timed_peak_kb, timed_peak_device = _proc_status_kb("VmHWM"), device_peak_mb(framework)
    figures = {"warmup_seconds": warmup_seconds, "seconds": seconds,
               "peak_rss_mb": max(load_peak_kb, timed_peak_kb) / 1024, "timed_peak_rss_mb": timed_peak_kb / 1024,
               "rss_increase_mb": max(timed_peak_kb - rss_before_kb, 0) / 1024,
               "peak_device_mb": None if timed_peak_device is None else max(load_peak_device, timed_peak_device),
               "timed_peak_device_mb": timed_peak_device if device_reset else None,
               "cores_used": cpu_seconds / seconds, "load_average_1m": os.getloadavg()[0],
               "warmup_compiles": compiled_before,
               "timed_compiles": None if compilations is None else len(compilations) - compiled_before}
    return figures, warm, out


def _torch_gguf_model(source: Path, dtype):
    """from_pretrained(gguf_file=...) wants accelerate; this is its loading, without it."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(source.parent), gguf_file=source.name)
    with torch.device("meta"):  # names only
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(source), return_tensors=True, model_to_load=skeleton)["tensors"]
    model = AutoModel.from_config(config, dtype=dtype, attn_implementation="sdpa")
    prefix = skeleton.base_model_prefix + "."
    model.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
    return model


def _torch_device():
    """CUDA where torch sees a GPU, as JAX then runs on it too: the ratio compares one device. Else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _torch_device_info(device) -> tuple[str, dict]:
    """(the device column, info): the GPU's name, or the CPU and the threads torch uses."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return name, {"device_kind": name, "devices": 1}
    return f"cpu, {torch.get_num_threads()} threads", {"device_kind": "cpu", "devices": 1}


def _torch_model(source: Path, dtype: str, device):
    """The base model (no LM head) in eval mode on `device`, SDPA attention, on every core."""
    import torch
    from transformers import AutoModel

    torch.set_num_threads(os.cpu_count())
    if source.suffix == ".gguf":
        model = _torch_gguf_model(source, getattr(torch, dtype))
    else:
        model = AutoModel.from_pretrained(str(source), dtype=getattr(torch, dtype), attn_implementation="sdpa")
    return model.to(device).eval()


def _torch_embed(model, input_ids, padding):
    """Bidirectional attention via a 4-D boolean mask [B, 1, L, L]; mean pooling; L2 normalisation."""
    import torch

    positions = (padding.long().cumsum(-1) - 1).clamp(min=0)
    mask = padding[:, None, None, :].expand(-1, 1, input_ids.shape[1], -1)
    hidden = model(input_ids=input_ids, attention_mask=mask, position_ids=positions).last_hidden_state.float()
    weights = padding.float()[..., None]
    return torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)


# --- encode


def _jax_encoder(job: dict):
    from diffemb_jax import parallel
    from diffemb_jax.embedding import Embedder

    mesh = parallel.make_mesh(**job["mesh"]) if job.get("mesh") else None  # else the default device alone
    embedder = Embedder.from_pretrained(job["model"], attention="bidirectional", dtype=job["dtype"], mesh=mesh,
                                        max_length=job["max_length"], batch_size=job["batch_size"],
                                        max_batch_tokens=job["max_batch_tokens"], pack_length=job["pack_length"])
    return lambda texts: embedder.encode(texts, progress=False), _jax_device(), _jax_info(embedder.model, mesh)


def _jax_device() -> str:
    """The device column: "cpu", or the accelerator's name (as torch's column gives it)."""
    import jax

    return "cpu" if jax.default_backend() == "cpu" else jax.devices()[0].device_kind


def _jax_info(model, mesh=None) -> dict:
    import jax

    return {"model_config": dataclasses.asdict(model.cfg), "device_kind": jax.devices()[0].device_kind,
            "devices": 1 if mesh is None else mesh.size}


def _torch_encoder(job: dict):
    """Tokenised, sorted, batched and padded to bucket lengths the way Embedder.encode does it (the
    parent sends the rows per batch of each bucket: this process imports no JAX)."""
    import tokenizers
    import torch

    device = _torch_device()
    model = _torch_model(Path(job["torch_source"]), job["dtype"], device)
    tokenizer = tokenizers.Tokenizer.from_file(job["tokenizer"])
    buckets, max_length = job["buckets"], job["max_length"]
    rows_per_batch = dict(zip(buckets, job["bucket_rows"]))

    @torch.inference_mode()
    def encode(texts):
        ids = [enc.ids[:max_length] for enc in tokenizer.encode_batch(texts)]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = torch.zeros(len(ids), model.config.hidden_size)
        start = 0
        while start < len(order):
            length = next(b for b in buckets if b >= len(ids[order[start]]))
            rows = order[start : start + rows_per_batch[length]]
            start += len(rows)
            input_ids = torch.zeros(len(rows), length, dtype=torch.long)
            padding = torch.zeros(len(rows), length, dtype=torch.bool)
            for r, i in enumerate(rows):
                input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
                padding[r, : len(ids[i])] = True
            out[rows] = _torch_embed(model, input_ids.to(device), padding.to(device)).cpu()  # .cpu() waits
        return out.numpy()

    return encode, *_torch_device_info(device)


def _encode_worker(framework: str, job: dict) -> dict:
    """Load, encode all the texts once untimed (warm-up: every batch shape compiled), then once timed."""
    encode, device, info = {"jax": _jax_encoder, "torch": _torch_encoder}[framework](job)
    figures, _, vectors = _measure(framework, lambda: encode(job["texts"]), lambda: encode(job["texts"]))
    if job.get("profile"):
        figures["profile"] = _profiled(framework, lambda: encode(job["texts"]), job["profile"])
    return {"device": device, **info, "compile_seconds": _compile_seconds(framework, figures),
            "tokens": job["tokens"], "texts": len(job["texts"]),
            "computed_tokens": job["computed_tokens"][framework], **figures,
            "tokens_per_s": job["tokens"] / figures["seconds"],
            "texts_per_s": len(job["texts"]) / figures["seconds"],
            "first_embeddings": vectors[:COMPARED].tolist()}


def _compile_seconds(framework: str, figures: dict) -> float:
    """XLA's compilation seconds before the timed part (the warm-up's every batch shape); PyTorch
    compiles nothing."""
    return sum(_jax_compilations()[: figures["warmup_compiles"]]) if framework == "jax" else 0.0


def _profiled(framework: str, work: Callable, out_dir: str) -> dict:
    """One more pass of `work`, after the timed part (so no timed figure carries the profiler's
    cost), under the framework's profiler: where the time goes. JAX writes an XProf trace (open
    it with `xprof --logdir DIR` or TensorBoard's profile plugin; perfetto_trace.json.gz also opens
    in ui.perfetto.dev), PyTorch a Chrome trace (ui.perfetto.dev) and its operators' totals."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if framework == "jax":
        import jax

        with jax.profiler.trace(str(out), create_perfetto_trace=True):
            work()
        return {"profile_dir": str(out), "files": sorted(str(p) for p in out.glob("plugins/profile/*/*"))}
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()  # as _torch_device: the worker ran there
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        work()  # returns plain values: the device work is done
    prof.export_chrome_trace(str(out / "trace.json"))
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=20)
    (out / "operators.txt").write_text(table + "\n")
    return {"profile_dir": str(out), "files": [str(out / "trace.json"), str(out / "operators.txt")]}


def out_of_memory(error: BaseException) -> bool:
    """An allocation that failed: XLA's RESOURCE_EXHAUSTED, torch's OutOfMemoryError (CUDA) or its
    CPU allocator's refusal. Anything else is a real error."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "can't allocate memory" in text


def _long_worker(framework: str, job: dict) -> dict:
    """One document of job["length"] tokens, batch 1: warm up (compile) once, then time once."""
    import logging

    length = job["length"]
    logging.getLogger("diffemb_jax.embedding.embedder").setLevel(logging.ERROR)  # no truncation notes
    single = {**job, "max_length": length, "batch_size": 1, "max_batch_tokens": None, "pack_length": 0,
              "buckets": [length], "bucket_rows": [1]}
    encode, device, info = {"jax": _jax_encoder, "torch": _torch_encoder}[framework](single)
    text = job["documents"][str(length)]
    result = {"device": device, **info, "length": length, "tokens": job["document_tokens"][str(length)]}
    try:
        figures, _, vectors = _measure(framework, lambda: encode([text]), lambda: encode([text]))
    except Exception as error:  # noqa: BLE001 - out of memory is a result here; anything else is raised
        if not out_of_memory(error):
            raise
        first_line = next(iter(str(error).strip().splitlines()), type(error).__name__)
        return {**result, "status": "out of memory", "error": first_line[:500],
                **dict.fromkeys(("seconds", "warmup_seconds", "compile_seconds", "tokens_per_s", "peak_rss_mb",
                                 "timed_peak_rss_mb", "rss_increase_mb", "peak_device_mb", "timed_peak_device_mb"))}
    if job.get("profile"):
        figures["profile"] = _profiled(framework, lambda: encode([text]), job["profile"])
    return {**result, "status": "ok", **figures, "compile_seconds": _compile_seconds(framework, figures),
            "tokens_per_s": result["tokens"] / figures["seconds"],
            "embedding": vectors[0].tolist()}


# --- train


def _jax_trainer(job: dict):
    """step(i) -> loss: diffemb_jax.training.step's jitted step on a LoRA-adapted Decoder, compiled
    ahead of time so that compilation is timed apart."""
    import warnings

    import jax
    import numpy as np

    from diffemb_jax.checkpoints import load_model
    from diffemb_jax import parallel
    from diffemb_jax.model import ForwardOptions
    from diffemb_jax.model.lora import LoraConfig, apply_lora
    from diffemb_jax.training.step import StepConfig, make_optimizer, placed_train_step, split_model

    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")  # CPU: no donation
    # --mesh over every device, or the first device alone
    mesh = parallel.make_mesh(**job["mesh"]) if job["mesh"] else parallel.make_mesh(1, devices=jax.devices()[:1])
    model, _ = load_model(job["model"], dtype=job["dtype"], progress=False, sharding_for=parallel.param_sharding(mesh))
    lora_cfg = job["lora"]
    model = apply_lora(model, LoraConfig(rank=lora_cfg["rank"], alpha=lora_cfg["alpha"],
                                         dropout=lora_cfg["dropout"]), seed=job["seed"])
    graphdef, lora, frozen = split_model(model)
    opt = job["optimizer"]
    tx, schedule = make_optimizer(opt["lr"], warmup_steps=0, total_steps=job["warmup_steps"] + job["steps"],
                                  grad_clip=opt["grad_clip"], weight_decay=opt["weight_decay"])
    step_cfg = StepConfig(batch_size=len(job["batch"]["query"]["input_ids"]), loss="in_batch", scale=job["scale"],
                          seed=job["seed"], grad_cache_chunk=job["grad_cache_chunk"],
                          forward=ForwardOptions(attention="bidirectional", remat=job["remat"]))
    # Placed as the Trainer places them, and kept there by the step: state placed otherwise than the
    # step's outputs would make step 1 compile again.
    lora, opt_state, train_step = placed_train_step(graphdef, lora, tx, schedule, step_cfg, mesh)
    batch = parallel.global_batch({key: np.asarray(value, np.int32) for key, value in job["packed"].items()}, mesh)
    state = {"lora": lora, "opt_state": opt_state}
    start = time.perf_counter()
    with jax.set_mesh(mesh):  # kernels that need it (splash) find the mesh
        train_step = train_step.lower(lora, opt_state, frozen, 0, batch).compile()
    info = {**_jax_info(model, mesh), "compile_seconds": time.perf_counter() - start}

    def step(i: int) -> float:
        state["lora"], state["opt_state"], metrics = train_step(state["lora"], state["opt_state"], frozen, i, batch)
        return float(metrics["loss"])  # blocks until the step is done

    return step, _jax_device(), info


def _torch_trainer(job: dict):
    """step(i) -> loss: transformers + peft LoRA, the same loss, AdamW, clipping and schedule."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft's call, deprecated
    torch.manual_seed(job["seed"])
    device = _torch_device()
    model = _torch_model(Path(job["torch_source"]), job["dtype"], device)
    if job["remat"] == "full":  # peft then makes the embeddings' output require grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora_cfg = job["lora"]
    # peft puts the adapters on the base layers' device, in float32 (autocast_adapter_dtype)
    model = get_peft_model(model, LoraConfig(r=lora_cfg["rank"], lora_alpha=lora_cfg["alpha"],
                                             lora_dropout=lora_cfg["dropout"], target_modules=list(LORA_TARGETS)))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = job["optimizer"]
    optimizer = torch.optim.AdamW(params, lr=opt["lr"], weight_decay=opt["weight_decay"])
    total = job["warmup_steps"] + job["steps"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / total))
    batch = {side: (torch.tensor(job["batch"][side]["input_ids"], dtype=torch.long, device=device),
                    torch.tensor(job["batch"][side]["padding_mask"], dtype=torch.bool, device=device))
             for side in SIDES}
    labels = torch.arange(len(job["batch"]["query"]["input_ids"]), device=device)

    def step(_: int) -> float:
        optimizer.zero_grad(set_to_none=True)
        q, pos, neg = (_torch_embed(model, *batch[side]) for side in SIDES)
        loss = torch.nn.functional.cross_entropy(q @ torch.cat([pos, neg]).T * job["scale"], labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, opt["grad_clip"])
        optimizer.step()
        schedule.step()
        return loss.item()  # waits for the step: no device work is queued after it

    device_name, info = _torch_device_info(device)
    return step, device_name, {**info, "compile_seconds": 0.0}


def _train_worker(framework: str, job: dict) -> dict:
    """Load, run --warmup-steps steps, then time --steps steps, all on the same batch."""
    step, device, info = {"jax": _jax_trainer, "torch": _torch_trainer}[framework](job)
    warmup, steps = job["warmup_steps"], job["steps"]
    info["computed_tokens"] = job["computed_tokens"][framework]
    figures, warm_losses, losses = _measure(framework, lambda: [step(i) for i in range(warmup)],
                                            lambda: [step(i) for i in range(warmup, warmup + steps)])
    losses = warm_losses + losses
    if job.get("profile"):  # one step more, its loss not among the timed ones
        figures["profile"] = _profiled(framework, lambda: step(warmup + steps), job["profile"])
    return {"device": device, **info, "remat": job["remat"], "dtype": job["dtype"],
            "grad_cache_chunk": job["grad_cache_chunk"] if framework == "jax" else 0,
            "tokens_per_step": job["tokens_per_step"], **figures,
            "step_seconds": figures["seconds"] / steps,
            "tokens_per_s": job["tokens_per_step"] * steps / figures["seconds"],
            "texts_per_s": len(SIDES) * len(job["batch"]["query"]["input_ids"]) * steps / figures["seconds"],
            "losses": losses, "first_loss": losses[0], "last_loss": losses[-1]}


def run_worker(framework: str, job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    if framework == "jax":
        _jax_compilations()  # counted from the start: loading, ahead-of-time compilation, warm-up
    result = {"framework": framework, **KINDS[job["what"]].work(framework, job)}
    Path(out_path).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- parent


PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"


@contextlib.contextmanager
def _parent_preallocation_off():
    """The parent may run JAX (converting the default model): on a GPU it must not take the memory the
    workers need. Yields the environment for the workers, with the caller's own setting and JAX's
    persistent compilation cache off."""
    caller = os.environ.get(PREALLOCATE)
    worker_env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}  # compile times are compilations
    os.environ[PREALLOCATE] = "false"
    try:
        yield worker_env
    finally:
        if caller is None:
            os.environ.pop(PREALLOCATE, None)
        else:
            os.environ[PREALLOCATE] = caller


def _label(key: str) -> str:
    """A run's name in the table and summary: encode keys its runs by framework, train by label."""
    return FRAMEWORKS.get(key, key)


def _spawn(key: str, framework: str, job: dict, job_path: Path, env: dict) -> dict:
    """One run in a child process of its own, so that the peak memory it reports is its own."""
    out_path = job_path.with_suffix(".out.json")
    job_path.write_text(json.dumps(job))
    cmd = [sys.executable, "-m", "diffemb_jax.bench", "--worker", framework, str(job_path), str(out_path)]
    print(f"running the {_label(key)} worker ...", flush=True)
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise SystemExit(f"diffemb bench: the {_label(key)} worker failed (exit status {rc}); its error is above")
    return json.loads(out_path.read_text())


def _folder_name(key: str) -> str:
    """A run's profile folder: its label, spaces and signs other than = . - _ made dashes."""
    return re.sub(r"[^A-Za-z0-9=._-]+", "-", _label(key))


def _command(args) -> str:
    parts = ["diffemb", "bench", args.what]
    for name in ("model", "shape", "tokenizer") + KINDS[args.what].flags + ("dtype", "peak_tflops", "profile", "json"):
        value = getattr(args, name)
        if value is True:
            parts.append("--" + name.replace("_", "-"))
        elif value is not None and value is not False:  # (0 == False: --pack-length 0 is kept)
            parts += ["--" + name.replace("_", "-"), str(value)]
    if not args.vs_torch:
        parts.append("--no-vs-torch")
    return " ".join(parts)


def _versions() -> dict:
    return {name: importlib.metadata.version(name)
            for name in ("jax", "jaxlib", "flax", "qwix", "optax", "torch", "transformers", "peft") if _installed(name)}


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def mesh_of(spec: str | None) -> dict | None:
    """--mesh DATA,FSDP,TENSOR -> {"data": ..., "fsdp": ..., "tensor": ...}; None: one device."""
    from diffemb_jax.parallel import MESH_AXES

    if spec is None:
        return None
    try:
        sizes = [int(x) for x in spec.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"--mesh takes three positive sizes DATA,FSDP,TENSOR whose product is the device count "
                         f"(e.g. 1,8,1), got {spec!r}")
    return dict(zip(MESH_AXES, sizes))


def batch_shards(mesh: dict | None) -> int:
    """How many ways --mesh splits a batch's rows: parallel.batch_shards of its sizes."""
    from diffemb_jax.parallel import BATCH_AXES

    return 1 if mesh is None else math.prod(mesh[axis] for axis in BATCH_AXES)


def _check_args(args) -> None:
    from diffemb_jax.cli import build_parser

    kind = KINDS[args.what]
    defaults = vars(build_parser().parse_args(["bench", args.what]))
    foreign = [name for other in KINDS.values() for name in other.flags
               if name not in kind.flags and getattr(args, name) != defaults[name]]
    if foreign:
        raise ValueError(f"diffemb bench {args.what} does not use "
                         + ", ".join("--" + name.replace("_", "-") for name in dict.fromkeys(foreign)))
    for name in kind.positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.what == "long":
        lengths_of(args.lengths)
    shards = batch_shards(mesh_of(args.mesh)) if args.what != "long" else 1
    if args.what == "encode" and args.batch_size % shards:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {shards} batch shards of --mesh "
                         f"{args.mesh} (data x fsdp)")
    if args.what == "train" and args.queries % shards:
        raise ValueError(f"--queries {args.queries} is not divisible by the {shards} batch shards of --mesh "
                         f"{args.mesh} (data x fsdp), as the global batch must be")
    if args.what == "encode" and args.max_batch_tokens < 0:
        raise ValueError(f"--max-batch-tokens must be >= 0 (0: no limit), got {args.max_batch_tokens}")
    if args.what == "encode" and args.pack_length < 0:
        raise ValueError(f"--pack-length must be >= 0 (0: one text a row), got {args.pack_length}")
    if args.what == "train":
        remat_policies(args.remat)
        if not 0 <= args.lora_dropout < 1:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
        if args.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
        if args.grad_cache_chunk < 0:
            raise ValueError(f"--grad-cache-chunk must be >= 0 (0: the plain step), got {args.grad_cache_chunk}")
        if args.vs_torch and not _installed("peft"):
            raise ModuleNotFoundError("diffemb bench train: the PyTorch side needs peft: pip install peft "
                                      "(or --no-vs-torch)")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise ValueError(f"--peak-tflops must be positive, got {args.peak_tflops}")
    if args.compile_only and args.profile:
        raise ValueError("diffemb bench long --compile-only runs nothing: it takes no --profile")
    if args.compile_only and args.tokenizer:
        raise ValueError("diffemb bench long --compile-only compiles the encoder from the model's shape alone: "
                         "it takes no --tokenizer")
    if args.model and args.shape:
        raise ValueError("diffemb bench: --model and --shape exclude each other (--shape benches random weights)")
    if args.tokenizer and not args.shape:
        raise ValueError("diffemb bench: --tokenizer is for --shape (a --model brings its own tokenizer)")
    if args.json and not Path(args.json).absolute().parent.is_dir():
        raise FileNotFoundError(f"the folder for --json {args.json} does not exist")


def _cell(fmt: str, result: dict) -> str:
    """A result's fields formatted, or NONE where one is None (device memory on the CPU)."""
    names = [name for _, name, _, _ in string.Formatter().parse(fmt) if name]
    return NONE if any(result[name] is None for name in names) else fmt.format(**result)


def _table(results: dict, columns: tuple[tuple[str, str], ...]) -> str:
    """Markdown; each column is (header, format of a result's fields); numbers are right-aligned."""
    rows = [[_label(key)] + [_cell(fmt, r) for _, fmt in columns] for key, r in results.items()]
    numeric = [all(re.fullmatch(r"[-+0-9.e]+|" + NONE, row[i + 1]) for row in rows) for i in range(len(columns))]
    lines = ["| framework | " + " | ".join(header for header, _ in columns) + " |",
             "|---|" + "".join("---:|" if n else "---|" for n in numeric)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --- encode


def _encode_job(args, tokenizer) -> tuple[dict, dict]:
    from diffemb_jax.embedding.embedder import plan_batches, rows_per_batch
    from diffemb_jax.embedding.packing import bucket_lengths

    texts = make_texts(tokenizer, args.texts, args.max_length)
    buckets = bucket_lengths(args.max_length)
    budget = args.max_batch_tokens or None
    mesh = mesh_of(args.mesh)
    settings = {"texts": len(texts), "tokens": token_count(tokenizer, texts, args.max_length),
                "batch_size": args.batch_size, "max_batch_tokens": budget, "max_length": args.max_length,
                "pack_length": args.pack_length, "dtype": args.dtype, "buckets": buckets, "mesh": mesh,
                "bucket_rows": [rows_per_batch(b, args.batch_size, budget) for b in buckets]}
    lengths = [min(len(enc.ids), args.max_length) for enc in tokenizer.encode_batch(texts)]
    # Tokens each framework computes, padding included: JAX its Embedder's padded rows (a multiple of
    # the mesh's batch shards); PyTorch the same batches one text a row, only as many rows as texts.
    jax_plan = plan_batches(lengths, buckets, args.batch_size, budget, batch_shards(mesh), args.pack_length)
    torch_plan = plan_batches(lengths, buckets, args.batch_size, budget, pack_length=0)
    settings["computed_tokens"] = {"jax": sum(rows * length for _, length, rows in jax_plan),
                                   "torch": sum(len(texts) * length for texts, length, _ in torch_plan)}
    return settings, {"texts": texts, "lengths": lengths}


def _encode_flops(job: dict, cfg: dict, result: dict) -> tuple[int, int, str]:
    """(model FLOPs, tokens) of the timed run, and the formula."""
    return sum(forward_flops(cfg, n) for n in job["lengths"]), job["tokens"], [FORWARD_FORMULA]


def _ratio(jax_r: dict, torch_r: dict) -> tuple[dict, str]:
    """JAX / PyTorch tokens/s, and per device where JAX ran on a mesh of several (PyTorch on one)."""
    ratio = jax_r["tokens_per_s"] / torch_r["tokens_per_s"]
    devices = jax_r.get("devices", 1)
    if devices == 1:
        return {"tokens_per_s_ratio": ratio}, f"{ratio:.2f}"
    per_device = ratio / devices
    return ({"tokens_per_s_ratio": ratio, "tokens_per_s_ratio_per_device": per_device},
            f"{ratio:.2f} (JAX on {devices} devices, PyTorch on one: {per_device:.2f} per device)")


def _encode_summary(results: dict) -> tuple[dict, list[str]]:
    import numpy as np

    first = {f: np.asarray(results[f].pop("first_embeddings")) for f in results}
    if "torch" not in results:
        return {}, []
    ratio, ratio_text = _ratio(results["jax"], results["torch"])
    summary = {**ratio, "max_abs_diff_first": float(np.abs(first["jax"] - first["torch"]).max())}
    return summary, [f"JAX / PyTorch tokens/s ratio: {ratio_text}",
                     f"max |jax - torch| on first {len(first['jax'])} embeddings: {summary['max_abs_diff_first']:.2e}"]


# --- train


def _train_job(args, tokenizer) -> tuple[dict, dict]:
    """One step's batch: PyTorch's as llm2vec's (each side padded to its longest), JAX's packed."""
    triples = make_triples(args.queries)
    lengths = {"query": args.query_length, "positive": args.doc_length, "negative": args.doc_length}
    batch = {side: padded(tokenizer, [t[i] for t in triples], lengths[side]) for i, side in enumerate(SIDES)}
    mesh = mesh_of(args.mesh)
    packed = packed_step(batch, max(lengths.values()), batch_shards(mesh))
    computed = {"jax": sum(map(len, packed["input_ids"])),
                "torch": sum(len(row) for side in SIDES for row in batch[side]["input_ids"])}
    settings = {"queries": args.queries, "query_length": args.query_length, "doc_length": args.doc_length,
                "tokens_per_step": sum(sum(map(sum, batch[side]["padding_mask"])) for side in SIDES),
                "computed_tokens": computed, "packed_rows": len(packed["input_ids"]), "mesh": mesh,
                "warmup_steps": args.warmup_steps, "steps": args.steps, "dtype": args.dtype,
                "remat": remat_policies(args.remat), "grad_cache_chunk": args.grad_cache_chunk,
                "attention": "bidirectional", "pooling": "mean", "loss": "in-batch InfoNCE, cosine x scale",
                "scale": SCALE, "seed": SEED,
                "lora": {"rank": args.lora_rank, "alpha": 2.0 * args.lora_rank, "dropout": args.lora_dropout,
                         "targets": list(LORA_TARGETS)},
                "optimizer": {"name": "AdamW", "lr": LR, "weight_decay": 0.0, "grad_clip": GRAD_CLIP,
                              "schedule": "linear from lr to 0 over warmup_steps + steps, no warm-up"}}
    return settings, {"batch": batch, "packed": packed}


def remat_policies(spec: str) -> list[str]:
    """--remat: one of the decoder's REMAT_POLICIES, a comma-separated list of them, or all."""
    from diffemb_jax.model.decoder import REMAT_POLICIES

    names = list(REMAT_POLICIES) if spec == "all" else [name.strip() for name in spec.split(",")]
    unknown = [name for name in names if name not in REMAT_POLICIES]
    if unknown:
        raise ValueError(f"--remat {spec}: unknown policy {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(REMAT_POLICIES)}, comma-separated, or all")
    return list(dict.fromkeys(names))


def _torch_remat(policy: str) -> str:
    """The PyTorch run a JAX policy is compared with: checkpointing off for none, else on (transformers'
    gradient checkpointing recomputes each layer from its input, as remat full does)."""
    return "none" if policy == "none" else "full"


def _train_label(framework: str, remat: str) -> str:
    if framework == "jax":
        return f"JAX remat={remat}"
    return f"PyTorch checkpointing={'off' if remat == 'none' else 'on'}"


def _train_runs(settings: dict) -> dict:
    """One JAX run per --remat policy, then one PyTorch run per checkpointing setting those need."""
    policies = settings["remat"]
    runs = [("jax", p) for p in policies] + [("torch", _torch_remat(p)) for p in policies]
    return {_train_label(framework, remat): (framework, {"remat": remat}) for framework, remat in runs}


def _train_flops(job: dict, cfg: dict, result: dict) -> tuple[int, int, str]:
    lengths = [sum(row) for side in SIDES for row in job["batch"][side]["padding_mask"]]
    per_step = sum(train_flops(cfg, n, job["lora"]["rank"]) for n in lengths)
    return per_step * job["steps"], job["tokens_per_step"] * job["steps"], [FORWARD_FORMULA, TRAIN_FORMULA]


def device_mismatch(results: dict) -> str | None:
    """A warning where one framework ran on the CPU and the other on an accelerator (torch without
    CUDA on a GPU machine, say): the ratio then compares two kinds of hardware."""
    if len({r["device_kind"] == "cpu" for r in results.values()}) == 1:
        return None
    return ("WARNING: " + ", ".join(f"{_label(key)} ran on {r['device']}" for key, r in results.items())
            + ": the ratio compares different hardware")


def _flops_summary(kind, job: dict, results: dict, peak: float | None) -> tuple[dict, list[str]]:
    """Model TFLOP/s of each run (into its result) and, where the peak is known, its MFU."""
    cfg = next(r["model_config"] for r in results.values() if r["framework"] == "jax")
    per_token, lines, unknown = {}, [], {}
    for key, r in results.items():
        flops, tokens, formula = kind.flops(job, cfg, r)
        per_token[key] = r["model_flops_per_token"] = flops / tokens
        ran = r.get("seconds") is not None
        r["model_tflops_per_s"] = flops / r["seconds"] / 1e12 if ran else None
        r["peak_tflops"] = peak_tflops(peak, r["device_kind"], job["dtype"])  # a device's
        devices = r.get("devices", 1)
        r["mfu"] = r["model_tflops_per_s"] / (r["peak_tflops"] * devices) if ran and r["peak_tflops"] else None
        if r["mfu"]:
            lines.append(f"{_label(key)} MFU: {r['mfu']:.2%} of "
                         + (f"{devices} x " if devices > 1 else "") + f"{r['peak_tflops']:g} TFLOP/s")
        elif ran:
            unknown.setdefault(r["device_kind"], []).append(_label(key))
    lines += [f"MFU of {', '.join(keys)}: unknown (no peak known for {device_kind} {job['dtype']}: pass --peak-tflops)"
              for device_kind, keys in unknown.items()]
    values = sorted(set(per_token.values()))
    head = (f"model FLOPs per token: {values[0] / 1e9:.4g} GFLOP" if len(values) == 1 else
            f"model FLOPs per token: {values[0] / 1e9:.4g} to {values[-1] / 1e9:.4g} GFLOP by length")
    lines = [head + ", from", *("  " + f for f in formula)] + lines
    return {"model_flops_per_token": values[0] if len(values) == 1 else None}, lines


def _agreement(diff: float, dtype: str) -> str:
    tolerance = FIRST_LOSS_TOLERANCE[dtype]
    return "(agree)" if diff <= tolerance else f"(WARNING: more than {tolerance:g} apart in {dtype})"


# What best_remat's lowest memory compares: the allocator's peak on an accelerator; on the CPU the
# timed steps' peak RSS, as loading (the same for every policy) is left out of it.
MEMORY_MEASURES = {"peak_device_mb": "peak device memory", "timed_peak_rss_mb": "timed steps' peak RSS"}


def _best_remat(runs: dict) -> dict:
    """The fastest JAX policy and the one of lowest peak memory; runs: {policy: result}."""
    memory = next(m for m in MEMORY_MEASURES if all(r[m] is not None for r in runs.values()))
    return {"fastest": max(runs, key=lambda p: runs[p]["tokens_per_s"]),
            "lowest_memory": min(runs, key=lambda p: runs[p][memory]), "memory": memory}


def _train_summary(results: dict) -> tuple[dict, list[str]]:
    """Each JAX policy against the PyTorch run with the matching checkpointing; the first losses of
    all runs must agree (LoRA B starts at zero: each is the base model's loss)."""
    runs = {f: {r["remat"]: r for r in results.values() if r["framework"] == f} for f in FRAMEWORKS}
    dtype = next(iter(results.values()))["dtype"]
    pairs, lines = {}, []
    for policy, jax_r in runs["jax"].items() if runs["torch"] else ():
        torch_r = runs["torch"][_torch_remat(policy)]
        jax_label, torch_label = _train_label("jax", policy), _train_label("torch", torch_r["remat"])
        ratio, ratio_text = _ratio(jax_r, torch_r)
        pair = pairs[policy] = {"pytorch": torch_label, **ratio,
                                "first_loss_abs_diff": abs(jax_r["first_loss"] - torch_r["first_loss"])}
        lines += [f"{jax_label} / {torch_label} tokens/s ratio: {ratio_text}",
                  f"first-step loss: {jax_label} {jax_r['first_loss']:.6f}, {torch_label} "
                  f"{torch_r['first_loss']:.6f}, |diff| {pair['first_loss_abs_diff']:.2e} "
                  + _agreement(pair["first_loss_abs_diff"], dtype)]
    chunk = next(iter(runs["jax"].values()))["grad_cache_chunk"] if runs["jax"] else 0
    if chunk:
        lines.append(f"JAX runs GradCache, {chunk} packed rows a chunk (the plain step's loss and gradients, one "
                     "chunk's activations live at a time); PyTorch its plain step")
    first = [r["first_loss"] for r in results.values()]
    summary = {"pairs": pairs, "first_loss_abs_diff": max(first) - min(first), "best_remat": _best_remat(runs["jax"])}
    if len(results) > (2 if pairs else 1):
        lines.append(f"first-step loss of all {len(results)} runs: max - min {summary['first_loss_abs_diff']:.2e} "
                     + _agreement(summary["first_loss_abs_diff"], dtype))
    if len(runs["jax"]) > 1:
        best = summary["best_remat"]
        fastest, lean = runs["jax"][best["fastest"]], runs["jax"][best["lowest_memory"]]
        lines.append(f"fastest JAX policy: remat={best['fastest']} ({fastest['tokens_per_s']:.0f} tokens/s); "
                     f"lowest peak memory: remat={best['lowest_memory']} "
                     f"({MEMORY_MEASURES[best['memory']]} {lean[best['memory']]:.0f} MB)")
    for key, r in results.items():
        lines.append(f"{_label(key)} losses by step: " + ", ".join(f"{x:.4f}" for x in r["losses"]))
    return summary, lines


# --- long


def lengths_of(spec: str) -> list[int]:
    """--lengths: ascending positive token counts, comma-separated."""
    try:
        lengths = [int(n) for n in spec.split(",")]
    except ValueError:
        raise ValueError(f"--lengths {spec}: give token counts separated by commas, e.g. 1024,4096") from None
    if not lengths or min(lengths) < 1 or lengths != sorted(set(lengths)):
        raise ValueError(f"--lengths {spec}: give distinct positive token counts in ascending order")
    return lengths


def long_document(tokenizer, length: int) -> str:
    """The standard library's docstrings, one after another until past `length` tokens, then cut to
    at most `length`: one long document of real prose and code."""
    docs = "\n\n".join(docstrings())
    text = docs
    while len(tokenizer.encode(text).ids) <= length:
        text += "\n\n" + docs
    return fit(tokenizer, text, length)


def _long_job(args, tokenizer) -> tuple[dict, dict]:
    lengths = lengths_of(args.lengths)
    documents = {str(n): long_document(tokenizer, n) for n in lengths}
    tokens = {n: len(tokenizer.encode(text).ids) for n, text in documents.items()}
    settings = {"lengths": lengths, "document_tokens": tokens, "batch_size": 1, "dtype": args.dtype,
                "time_limit": args.time_limit, "attention": "bidirectional", "pooling": "mean"}
    return settings, {"documents": documents}


def _long_runs(settings: dict) -> dict:
    """Each framework at each length, shortest first; JAX first."""
    return {f"{FRAMEWORKS[f]} {n}": (f, {"length": n}) for f in FRAMEWORKS for n in settings["lengths"]}


def _quadratic_guess(points: list[tuple[int, float]], length: int) -> float:
    """The last value plus the last increase scaled as length squared: growth is at most quadratic
    in length (attention), so this errs high."""
    (a, fa), (b, fb) = points[-2:]
    return fb + max(fb - fa, 0.0) * (length * length - b * b) / (b * b - a * a)


def _long_skip(framework: str, changes: dict, results: dict, settings: dict) -> str | None:
    """Why a length is not tried: a shorter one ran out of memory, or it would take too long (or, on
    the CPU, more memory than there is) going by the two lengths before it."""
    done = [r for r in results.values() if r["framework"] == framework]
    if any(r["status"] == "out of memory" for r in done):
        return "a shorter length ran out of memory"
    if len(done) < 2:
        return None
    length = changes["length"]
    seconds = _quadratic_guess([(r["length"], r["warmup_seconds"] + r["seconds"]) for r in done], length)
    if seconds > settings["time_limit"]:
        return f"would take about {seconds:.0f} s, past --time-limit {settings['time_limit']:g}"
    if done[-1]["device_kind"] == "cpu":
        rss = _quadratic_guess([(r["length"], r["peak_rss_mb"]) for r in done], length)
        available = available_host_mb() * 0.9
        if rss > available:
            return f"would need about {rss:.0f} MB of memory; {available:.0f} MB are free"
    return None


def _long_flops(job: dict, cfg: dict, result: dict) -> tuple[int, int, str]:
    return forward_flops(cfg, result["tokens"]), result["tokens"], [FORWARD_FORMULA]


def _long_summary(results: dict) -> tuple[dict, list[str]]:
    import numpy as np

    ran = {f: [r for r in results.values() if r["framework"] == f and r["status"] == "ok"]
           for f in FRAMEWORKS if any(r["framework"] == f for r in results.values())}
    longest = {f: max((r["length"] for r in runs), default=None) for f, runs in ran.items()}
    lines = []
    for f, runs in ran.items():
        if not runs:
            lines.append(f"{FRAMEWORKS[f]}: no length ran")
            continue
        best = max(runs, key=lambda r: r["length"])
        memory = (f"peak device {best['peak_device_mb']:.0f} MB" if best["peak_device_mb"] is not None
                  else f"peak RSS {best['peak_rss_mb']:.0f} MB")
        lines.append(f"{FRAMEWORKS[f]}: longest length run {best['length']} ({best['tokens']} tokens) in "
                     f"{best['seconds']:.2f} s, {memory}")
    ratios, diffs = {}, {}
    for jax_r in ran["jax"]:
        torch_r = next((r for r in ran.get("torch", ()) if r["length"] == jax_r["length"]), None)
        if torch_r:
            n = str(jax_r["length"])
            ratios[n] = jax_r["tokens_per_s"] / torch_r["tokens_per_s"]
            diffs[n] = float(np.abs(np.asarray(jax_r["embedding"]) - np.asarray(torch_r["embedding"])).max())
    for r in results.values():
        r.pop("embedding", None)
    if ratios:
        lines.append("JAX / PyTorch tokens/s ratio by length: "
                     + ", ".join(f"{n}: {ratio:.2f}" for n, ratio in ratios.items()))
        lines.append("max |jax - torch| of the embedding by length: "
                     + ", ".join(f"{n}: {diff:.2e}" for n, diff in diffs.items()))
    return {"longest": longest, "tokens_per_s_ratio_by_length": ratios, "max_abs_diff_by_length": diffs}, lines


def long_plan(args) -> dict:
    """--compile-only: JAX alone compiles the encoder for one document of each length, from the
    shape alone (--shape's, or --model's config: no weights are made or read, nothing runs), and
    reports XLA's memory analysis: whether each length fits the device, in seconds a length."""
    import jax.numpy as jnp
    from flax import nnx

    from diffemb_jax.checkpoints import model_config
    from diffemb_jax.embedding import Embedder
    from diffemb_jax.model import Decoder, ForwardOptions
    from diffemb_jax.model.config import config_from_hf

    shape = None if args.model else args.shape or DEFAULT_SHAPE
    if shape is None:
        cfg = model_config(args.model)  # its config alone
    else:
        model_type, fields = SHAPES[shape]
        cfg = config_from_hf({"model_type": model_type, **fields, "max_position_embeddings": LONGEST})
    dtype = jnp.dtype(args.dtype)
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
    lengths = lengths_of(args.lengths)
    # kernel auto, as `diffemb encode` runs: cuDNN on a GPU, splash on a TPU
    embedder = Embedder(model, None, max_length=lengths[-1], batch_size=1, max_batch_tokens=None, pack_length=0,
                        options=ForwardOptions(kernel="auto"))
    device, limit = device_capacity()
    settings = {"model": args.model, "shape": shape, "dtype": args.dtype, "lengths": lengths, "device": device,
                "device_bytes": limit}
    print(f"command: {_command(args)}\nsettings: {json.dumps(settings)}", flush=True)
    results = {}
    for length in lengths:
        start = time.perf_counter()
        stats = embedder.compiled_for(length).memory_analysis()
        total = compiled_bytes(stats)
        results[f"JAX {length}"] = {
            "device": device, "length": length, "compile_seconds": time.perf_counter() - start,
            "arguments_gib": stats.argument_size_in_bytes / 2**30, "temporaries_gib": stats.temp_size_in_bytes / 2**30,
            "total_gib": total / 2**30, "fits": "?" if limit is None else ("yes" if total <= limit else "no")}
    fitting = [r["length"] for r in results.values() if r["fits"] == "yes"]
    report = {"command": _command(args), "settings": settings, "results": results,
              "longest_fitting": max(fitting, default=None) if limit is not None else None}
    columns = (("device", "{device}"), ("weights + inputs GiB", "{arguments_gib:.2f}"),
               ("temporaries GiB", "{temporaries_gib:.2f}"), ("total GiB", "{total_gib:.2f}"),
               ("fits", "{fits}"), ("compile s", "{compile_seconds:.1f}"))
    print("\n" + _table(results, columns) + "\n")
    shortest = results[next(iter(results))]
    # jax < 0.12 on the CPU: float32 copies of bfloat16 weights for the matmuls, temporaries above the weights
    copies = device == "cpu" and args.dtype == "bfloat16" and shortest["temporaries_gib"] > shortest["arguments_gib"]
    print("XLA's memory analysis of the compiled encoder, one document a length; the device holds "
          + ("an unknown amount" if limit is None else f"{limit / 2**30:.1f} GiB")
          + (f". At {shortest['length']} tokens the temporaries exceed the weights: XLA on this CPU holds float32 "
             "copies of the bfloat16 weights for its matmuls (jax 0.12 does not), which a GPU does not"
             if copies else "") + ".")
    return report


@dataclasses.dataclass(frozen=True)
class Kind:
    """One thing to bench: its flags, the job the parent builds, the workers' work, the report."""

    flags: tuple[str, ...]  # argparse names of this kind only, echoed in the command
    positive: tuple[str, ...]  # of those, the ones that must be >= 1
    prepare: Callable  # (args, tokenizer) -> (settings: reported, payload: sent to workers only)
    runs: Callable  # (settings) -> {key: (framework, what its job changes)}: one worker each, in turn
    work: Callable  # in the worker: (framework, job) -> result
    flops: Callable  # (job, model config dict, a run's result) -> its (model FLOPs, tokens), formula lines
    columns: tuple[tuple[str, str], ...]
    summarize: Callable  # (results) -> (summary fields, lines to print)
    skip: Callable | None = None  # (framework, changes, results so far, settings) -> why a run is not made


KINDS = {
    "encode": Kind(
        flags=("texts", "batch_size", "max_batch_tokens", "max_length", "pack_length", "mesh"),
        positive=("texts", "batch_size", "max_length"),
        prepare=_encode_job, runs=lambda settings: {f: (f, {}) for f in FRAMEWORKS}, work=_encode_worker,
        summarize=_encode_summary, flops=_encode_flops,
        columns=(("device", "{device}"), ("devices", "{devices}"), ("tokens/s", "{tokens_per_s:.0f}"),
                 ("texts/s", "{texts_per_s:.1f}"),
                 ("tokens computed", "{computed_tokens}"),
                 ("model TFLOP/s", "{model_tflops_per_s:.3f}"), ("compile s", "{compile_seconds:.2f}"),
                 ("warm-up s", "{warmup_seconds:.2f}"), ("peak RSS MB", "{peak_rss_mb:.0f}"),
                 ("RSS increase MB", "{rss_increase_mb:.0f}"), ("peak device MB", "{peak_device_mb:.0f}"),
                 ("cores used", "{cores_used:.2f}"), ("load 1 min", "{load_average_1m:.2f}"))),
    "train": Kind(
        flags=("queries", "query_length", "doc_length", "lora_rank", "lora_dropout", "remat", "grad_cache_chunk",
               "warmup_steps", "steps", "mesh"),
        positive=("queries", "query_length", "doc_length", "lora_rank", "steps"),
        prepare=_train_job, runs=_train_runs, work=_train_worker, summarize=_train_summary, flops=_train_flops,
        columns=(("device", "{device}"), ("devices", "{devices}"), ("remat", "{remat}"),
                 ("tokens/s", "{tokens_per_s:.0f}"), ("texts/s", "{texts_per_s:.1f}"),
                 ("tokens computed", "{computed_tokens}"),
                 ("model TFLOP/s", "{model_tflops_per_s:.3f}"), ("step s", "{step_seconds:.2f}"),
                 ("compile s", "{compile_seconds:.2f}"), ("warm-up s", "{warmup_seconds:.2f}"),
                 ("peak RSS MB", "{peak_rss_mb:.0f}"), ("timed steps' peak RSS MB", "{timed_peak_rss_mb:.0f}"),
                 ("peak device MB", "{peak_device_mb:.0f}"),
                 ("cores used", "{cores_used:.2f}"), ("load 1 min", "{load_average_1m:.2f}"),
                 ("first loss", "{first_loss:.6f}"), ("last loss", "{last_loss:.6f}"))),
    "long": Kind(
        flags=("lengths", "time_limit", "compile_only"), positive=("time_limit",),
        prepare=_long_job, runs=_long_runs, work=_long_worker, summarize=_long_summary, flops=_long_flops,
        skip=_long_skip,
        columns=(("device", "{device}"), ("length", "{length}"), ("tokens", "{tokens}"), ("status", "{status}"),
                 ("seconds", "{seconds:.2f}"), ("tokens/s", "{tokens_per_s:.0f}"),
                 ("model TFLOP/s", "{model_tflops_per_s:.3f}"), ("compile s", "{compile_seconds:.2f}"),
                 ("warm-up s", "{warmup_seconds:.2f}"),
                 ("peak device MB", "{peak_device_mb:.0f}"), ("peak RSS MB", "{peak_rss_mb:.0f}"),
                 ("RSS increase MB", "{rss_increase_mb:.0f}"), ("load 1 min", "{load_average_1m:.2f}")))
}


def main(args) -> dict:
    """Bench each run in turn (or, --compile-only, plan each length), print the comparison, and return
    it (also written to --json)."""
    from diffemb_jax.embedding.files import write_json_atomic

    _check_args(args)
    report = long_plan(args) if args.compile_only else _compare(args, KINDS[args.what])
    if args.json:
        write_json_atomic(Path(args.json), report)
        print(f"wrote {args.json}")
    return report


def _compare(args, kind: Kind) -> dict:
    """Each run of `kind` in a worker of its own, in turn; the table and summary printed; the report."""
    from diffemb_jax.demo import converted_smollm2

    with tempfile.TemporaryDirectory(prefix="diffemb-bench-") as tmp, _parent_preallocation_off() as worker_env:
        if args.shape:
            model = random_checkpoint(args.shape, Path(tmp) / args.shape, args.dtype,
                                      shape_tokenizer(args.tokenizer, args.shape))
        else:
            model = Path(args.model) if args.model else converted_smollm2()
        if not model.exists():
            raise FileNotFoundError(f"{model} does not exist")
        tokenizer = tokenizer_for(model)
        settings, payload = kind.prepare(args, tokenizer)
        settings = {"model": str(model), "shape": args.shape, "vs_torch": args.vs_torch,
                    "torch_source": str(torch_source(model)) if args.vs_torch else None, **settings,
                    "versions": _versions(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
        print(f"command: {_command(args)}")
        print("settings: " + json.dumps(settings))
        tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        job = {**settings, "what": args.what, "tokenizer": os.path.join(tmp, "tokenizer.json"), **payload}
        results, skipped = {}, {}
        runs = {key: run for key, run in kind.runs(settings).items() if args.vs_torch or run[0] == "jax"}
        for i, (key, (framework, changes)) in enumerate(runs.items()):
            reason = kind.skip(framework, changes, results, settings) if kind.skip else None
            if reason:
                skipped[key] = reason
                print(f"not running {key}: {reason}", flush=True)
                continue
            if args.profile:
                changes = {**changes, "profile": str(Path(args.profile).absolute() / _folder_name(key))}
            results[key] = _spawn(key, framework, {**job, **changes}, Path(tmp) / f"job{i}.json", worker_env)
    summary, lines = kind.summarize(results)
    lines += [f"{key}: not run, {reason}" for key, reason in skipped.items()]
    flops, flops_lines = _flops_summary(kind, job, results, args.peak_tflops)
    mismatch = device_mismatch(results)
    report = {"command": _command(args), "settings": settings, "results": results, "skipped": skipped, **summary,
              **flops, "device_mismatch": mismatch}
    lines = ([mismatch] if mismatch else []) + lines
    lines += [f"{_label(key)} compiled {result['timed_compiles']} XLA programs in its timed part: its time "
              "includes compilation" for key, result in results.items() if result.get("timed_compiles")]
    lines += [f"{_label(key)}: profile of one more untimed pass in {result['profile']['profile_dir']}"
              for key, result in results.items() if result.get("profile")]
    print("\n" + _table(results, kind.columns) + "\n")
    print("\n".join(lines + flops_lines))
    return report


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "--worker" or sys.argv[2] not in FRAMEWORKS:
        sys.exit("usage: python -m diffemb_jax.bench --worker jax|torch JOB.json OUT.json")
    run_worker(*sys.argv[2:])
