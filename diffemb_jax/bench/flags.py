"""`diffemb bench encode|train|long|serve` on the command line: a subcommand a kind, each taking its own
flags and the common ones (argparse refuses a flag that a kind does not take), the checks argparse
cannot make, what the flags' values mean, and the command echoed in the report."""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

from diffemb_jax.bench.shapes import SHAPES
from diffemb_jax.batching import DEFAULT_MAX_BATCH_TOKENS, PACK_LENGTH
from diffemb_jax.errors import ConfigError, MissingPathError
from diffemb_jax.model.decoder import REMAT_POLICIES
from diffemb_jax.parallel import BATCH_AXES, MESH_AXES
from diffemb_jax.training.config import base_config

RECIPE = base_config()  # the project's training defaults


def add_parser(subparsers) -> argparse.ArgumentParser:
    """`bench` and its kinds, added to `diffemb`'s subcommands; the caller sets what it runs."""
    bench = subparsers.add_parser("bench", help="speed and memory against the PyTorch reference",
                                  description="JAX against the PyTorch reference, or alone: speed and memory. "
                                  "diffemb bench KIND --help lists a kind's flags.")
    kinds = bench.add_subparsers(dest="what", metavar="KIND", required=True)
    for what, (help_text, own_flags) in KIND_FLAGS.items():
        p = kinds.add_parser(what, help=help_text)
        echoed = [*_model_flags(p), *own_flags(p), *_report_flags(p)]
        p.add_argument("--vs-torch", action=argparse.BooleanOptionalAction, default=True,
                       help="also run the PyTorch reference (transformers + peft) and compare (default); "
                       "--no-vs-torch runs JAX alone")
        p.set_defaults(echoed=tuple(action.dest for action in echoed))
    return bench


def _model_flags(p) -> list:
    return [
        p.add_argument("--model", default=None, help="model to bench (default: the bundled SmolLM2-135M)"),
        p.add_argument("--shape", default=None, choices=tuple(SHAPES),
                       help="bench this model shape at random weights instead, written once to the cache and "
                       "reused (on CPU only the small ones are practical)"),
        p.add_argument("--tokenizer", default=None, help="--shape: a tokenizer.json, model directory or .gguf to "
                       "make the token ids with (default: the bundled SmolLM2's), where the bundled model is not "
                       "installed")]


def _mesh_flag(p, what: str):
    return p.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                          help=f"JAX {what} on a mesh of every device (product = device count; rows split over "
                          "data x fsdp, weights over fsdp and tensor) instead of one device; ratios then also per "
                          "device")


def _encode_flags(p) -> list:
    return [
        p.add_argument("--texts", type=int, default=64, help="number of texts"),
        p.add_argument("--batch-size", type=int, default=16, help="rows per batch, as diffemb encode's"),
        p.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS,
                       help="at most this many padded tokens per batch, as diffemb encode's; 0: no limit"),
        p.add_argument("--max-length", type=int, default=128),
        p.add_argument("--pack-length", type=int, default=PACK_LENGTH,
                       help="JAX packs texts of at most this many tokens several to a row; 0: one a row, "
                       "as the PyTorch reference runs"),
        _mesh_flag(p, "encodes")]


def _train_flags(p) -> list:
    return [
        p.add_argument("--queries", type=int, default=8,
                       help="queries per step, each with a positive and a hard negative"),
        p.add_argument("--query-length", type=int, default=32, help="most tokens per query"),
        p.add_argument("--doc-length", type=int, default=128, help="most tokens per document"),
        p.add_argument("--lora-rank", type=int, default=RECIPE.lora.rank,
                       help="LoRA rank (alpha = 2 x rank; default: the recipe's, %(default)s)"),
        p.add_argument("--lora-dropout", type=float, default=RECIPE.lora.dropout,
                       help="dropout on the adapters' input (default: the recipe's, %(default)s)"),
        p.add_argument("--remat", default="none", metavar="POLICY[,POLICY...]|all",
                       help=f"JAX gradient checkpointing ({', '.join(REMAT_POLICIES)}); a list compares them, one "
                       "JAX run each; PyTorch runs with checkpointing off for none, on for the others, once a "
                       "setting"),
        p.add_argument("--grad-cache-chunk", type=int, default=0, metavar="ROWS",
                       help="JAX runs GradCache with this many packed rows a chunk (0: the plain step); PyTorch "
                       "runs its plain step"),
        p.add_argument("--warmup-steps", type=int, default=1, help="untimed steps first (JAX: compilation)"),
        p.add_argument("--steps", type=int, default=5, help="timed steps"),
        _mesh_flag(p, "trains")]


def _long_flags(p) -> list:
    return [
        p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768",
                       help="document lengths in tokens, ascending"),
        p.add_argument("--time-limit", type=float, default=300.0,
                       help="do not try a length predicted to take more seconds than this"),
        p.add_argument("--compile-only", action="store_true",
                       help="JAX alone compiles the encoder of --shape or --model (its config; default: the "
                       "bundled model's shape) for each length, with no weights made or read, and reports XLA's "
                       "memory analysis: what fits, in seconds")]


def _serve_flags(p) -> list:
    return [
        p.add_argument("--queries", type=int, default=256, help="single-query requests (one short text each)"),
        p.add_argument("--concurrency", type=int, default=64, help="single-query requests in flight at once"),
        p.add_argument("--bursts", type=int, default=16, help="requests of --burst-size documents each"),
        p.add_argument("--burst-size", type=int, default=32, help="documents a burst request"),
        p.add_argument("--burst-concurrency", type=int, default=4, help="burst requests in flight at once"),
        p.add_argument("--duration", type=float, default=120.0,
                       help="seconds a workload may take at most: no request is started after them"),
        p.add_argument("--batch-size", type=int, default=16, help="rows per batch, as diffemb serve's"),
        p.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS,
                       help="as diffemb serve's (the device loop's take and the batches' tokens)"),
        p.add_argument("--max-length", type=int, default=128),
        p.add_argument("--max-wait-ms", type=float, default=5.0, help="as diffemb serve's"),
        p.add_argument("--encoding-format", choices=("float", "base64"), default="float",
                       help="what the load asks /v1/embeddings for (float: JSON numbers, the API's default)"),
        p.add_argument("--startup-timeout", type=float, default=900.0,
                       help="seconds the server may take to answer /health (its warm-up compiles every shape)")]


def _report_flags(p) -> list:
    return [
        p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32"),
        p.add_argument("--scan-layers", action="store_true",
                       help="JAX runs the decoder's layers as one lax.scan (one layer compiled, not each)"),
        p.add_argument("--peak-tflops", type=float, default=None,
                       help="the device's peak TFLOP/s at --dtype, for MFU (default: known GPUs only)"),
        p.add_argument("--profile", default=None, metavar="DIR",
                       help="after the timed part, profile one more pass of each run (encode: the texts once "
                       "more; train: one step; long: the document) into DIR/<run>: an XProf trace for JAX, a "
                       "Chrome trace and operator table for PyTorch"),
        p.add_argument("--json", default=None, help="also write the results to this JSON file")]


KIND_FLAGS = {
    "encode": ("embed texts, both frameworks", _encode_flags),
    "train": ("the LoRA train step, both frameworks", _train_flags),
    "long": ("one long document per length: how long fits, and its time", _long_flags),
    "serve": ("diffemb serve under load, against diffemb encode offline and a sentence-transformers loop",
              _serve_flags),
}


def command_line(args) -> str:
    """The command that gives `args`, its flags in the order --help lists them (zeros kept)."""
    parts = ["diffemb", "bench", args.what]
    for name in args.echoed:
        value = getattr(args, name)
        if value is True:
            parts.append("--" + name.replace("_", "-"))
        elif value is not None and value is not False:  # (0 == False: --pack-length 0 is kept)
            parts += ["--" + name.replace("_", "-"), str(value)]
    if not args.vs_torch:
        parts.append("--no-vs-torch")
    return " ".join(parts)


# ----------------------------------------------------------------------------- the flags' values


def mesh_of(spec: str | None) -> dict | None:
    """--mesh DATA,FSDP,TENSOR -> {"data": ..., "fsdp": ..., "tensor": ...}; None: one device."""
    if spec is None:
        return None
    try:
        sizes = [int(x) for x in spec.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) != 3 or min(sizes) < 1:
        raise ConfigError(f"--mesh takes three positive sizes DATA,FSDP,TENSOR whose product is the device count "
                         f"(e.g. 1,8,1), got {spec!r}")
    return dict(zip(MESH_AXES, sizes))


def batch_shards(mesh: dict | None) -> int:
    """How many ways --mesh splits a batch's rows: parallel.batch_shards of its sizes."""
    return 1 if mesh is None else math.prod(mesh[axis] for axis in BATCH_AXES)


def lengths_of(spec: str) -> list[int]:
    """--lengths: ascending positive token counts, comma-separated."""
    try:
        lengths = [int(n) for n in spec.split(",")]
    except ValueError:
        raise ConfigError(f"--lengths {spec}: give token counts separated by commas, e.g. 1024,4096") from None
    if not lengths or min(lengths) < 1 or lengths != sorted(set(lengths)):
        raise ConfigError(f"--lengths {spec}: give distinct positive token counts in ascending order")
    return lengths


def remat_policies(spec: str) -> list[str]:
    """--remat: one of the decoder's REMAT_POLICIES, a comma-separated list of them, or all."""
    names = list(REMAT_POLICIES) if spec == "all" else [name.strip() for name in spec.split(",")]
    unknown = [name for name in names if name not in REMAT_POLICIES]
    if unknown:
        raise ConfigError(f"--remat {spec}: unknown policy {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(REMAT_POLICIES)}, comma-separated, or all")
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------- checks


def check(args) -> None:
    """What argparse does not check: values in range, flags that exclude each other, a batch that
    --mesh divides, the folder of --json. A ConfigError (MissingPathError) names the flag."""
    {"encode": _check_encode, "train": _check_train, "long": _check_long, "serve": _check_serve}[args.what](args)
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise ConfigError(f"--peak-tflops must be positive, got {args.peak_tflops}")
    if args.model and args.shape:
        raise ConfigError("diffemb bench: --model and --shape exclude each other (--shape benches random weights)")
    if args.tokenizer and not args.shape:
        raise ConfigError("diffemb bench: --tokenizer is for --shape (a --model brings its own tokenizer)")
    if args.json and not Path(args.json).absolute().parent.is_dir():
        raise MissingPathError(f"the folder for --json {args.json} does not exist")


def _positive(args, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")


def _check_encode(args) -> None:
    _positive(args, "texts", "batch_size", "max_length")
    shards = batch_shards(mesh_of(args.mesh))
    if args.batch_size % shards:
        raise ConfigError(f"--batch-size {args.batch_size} is not divisible by the {shards} batch shards of --mesh "
                         f"{args.mesh} (data x fsdp)")
    if args.max_batch_tokens < 0:
        raise ConfigError(f"--max-batch-tokens must be >= 0 (0: no limit), got {args.max_batch_tokens}")
    if args.pack_length < 0:
        raise ConfigError(f"--pack-length must be >= 0 (0: one text a row), got {args.pack_length}")


def _check_train(args) -> None:
    _positive(args, "queries", "query_length", "doc_length", "lora_rank", "steps")
    shards = batch_shards(mesh_of(args.mesh))
    if args.queries % shards:
        raise ConfigError(f"--queries {args.queries} is not divisible by the {shards} batch shards of --mesh "
                         f"{args.mesh} (data x fsdp), as the global batch must be")
    remat_policies(args.remat)
    if not 0 <= args.lora_dropout < 1:
        raise ConfigError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.warmup_steps < 0:
        raise ConfigError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.grad_cache_chunk < 0:
        raise ConfigError(f"--grad-cache-chunk must be >= 0 (0: the plain step), got {args.grad_cache_chunk}")
    if args.vs_torch and importlib.util.find_spec("peft") is None:
        raise ModuleNotFoundError("diffemb bench train: the PyTorch side needs peft: pip install peft "
                                  "(or --no-vs-torch)")


def _check_long(args) -> None:
    _positive(args, "time_limit")
    lengths_of(args.lengths)
    if args.compile_only and args.profile:
        raise ConfigError("diffemb bench long --compile-only runs nothing: it takes no --profile")
    if args.compile_only and args.tokenizer:
        raise ConfigError("diffemb bench long --compile-only compiles the encoder from the model's shape alone: "
                         "it takes no --tokenizer")


def _check_serve(args) -> None:
    _positive(args, "queries", "concurrency", "bursts", "burst_size", "burst_concurrency", "duration", "batch_size",
              "max_length", "startup_timeout")
    if args.max_wait_ms < 0:
        raise ConfigError(f"--max-wait-ms must be >= 0, got {args.max_wait_ms}")
    if args.max_batch_tokens < 0:
        raise ConfigError(f"--max-batch-tokens must be >= 0 (0: no limit), got {args.max_batch_tokens}")
    if args.profile or args.peak_tflops is not None:
        raise ConfigError("diffemb bench serve reports throughput and latency: it takes no --profile or --peak-tflops")
