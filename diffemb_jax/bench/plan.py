"""`diffemb bench long --compile-only`: how long a document fits, in seconds. JAX alone compiles the
encoder from the model's shape (no weights made or read, nothing run) and reads XLA's memory analysis
at each length. The forward settings' call site (the Decoder's kernel) is here."""

from __future__ import annotations

import json
import time

import jax.numpy as jnp
from flax import nnx

from diffemb_jax.bench.flags import command_line, lengths_of
from diffemb_jax.bench.report import table
from diffemb_jax.bench.shapes import DEFAULT_SHAPE, LONGEST, SHAPES
from diffemb_jax.checkpoints import model_config
from diffemb_jax.embedding import Embedder
from diffemb_jax.memory import compiled_bytes, device_capacity
from diffemb_jax.model import Decoder, ForwardOptions
from diffemb_jax.checkpoints.families import config_from_hf


def long_plan(args) -> dict:
    """--compile-only: JAX alone compiles the encoder for one document of each length, from the
    shape alone (--shape's, or --model's config: no weights are made or read, nothing runs), and
    reports XLA's memory analysis: whether each length fits the device, in seconds a length."""
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
                        options=ForwardOptions(kernel="auto", scan_layers=args.scan_layers))
    device, limit = device_capacity()
    settings = {"model": args.model, "shape": shape, "dtype": args.dtype, "scan_layers": args.scan_layers,
                "lengths": lengths, "device": device,
                "device_bytes": limit}
    print(f"command: {command_line(args)}\nsettings: {json.dumps(settings)}", flush=True)
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
    report = {"command": command_line(args), "settings": settings, "results": results,
              "longest_fitting": max(fitting, default=None) if limit is not None else None}
    columns = (("device", "{device}"), ("weights + inputs GiB", "{arguments_gib:.2f}"),
               ("temporaries GiB", "{temporaries_gib:.2f}"), ("total GiB", "{total_gib:.2f}"),
               ("fits", "{fits}"), ("compile s", "{compile_seconds:.1f}"))
    print("\n" + table(results, columns) + "\n")
    shortest = results[next(iter(results))]
    # jax < 0.12 on the CPU: float32 copies of bfloat16 weights for the matmuls, temporaries above the weights
    copies = device == "cpu" and args.dtype == "bfloat16" and shortest["temporaries_gib"] > shortest["arguments_gib"]
    print("XLA's memory analysis of the compiled encoder, one document a length; the device holds "
          + ("an unknown amount" if limit is None else f"{limit / 2**30:.1f} GiB")
          + (f". At {shortest['length']} tokens the temporaries exceed the weights: XLA on this CPU holds float32 "
             "copies of the bfloat16 weights for its matmuls (jax 0.12 does not), which a GPU does not"
             if copies else "") + ".")
    return report
