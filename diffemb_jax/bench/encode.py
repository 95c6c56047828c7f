"""`diffemb bench encode`, the parent's part: the texts and the batches both frameworks run, the
model FLOPs of encoding them, and the comparison of the two runs."""

from __future__ import annotations

import numpy as np

from diffemb_jax.bench.corpus import make_texts, token_count
from diffemb_jax.bench.flags import batch_shards, mesh_of
from diffemb_jax.bench.flops import FORWARD_FORMULA, forward_flops
from diffemb_jax.bench.report import FRAMEWORKS, speed_ratio
from diffemb_jax.batching import bucket_lengths, plan_batches, rows_per_batch

COLUMNS = (("device", "{device}"), ("devices", "{devices}"), ("tokens/s", "{tokens_per_s:.0f}"),
           ("texts/s", "{texts_per_s:.1f}"),
           ("tokens computed", "{computed_tokens}"),
           ("model TFLOP/s", "{model_tflops_per_s:.3f}"), ("compile s", "{compile_seconds:.2f}"),
           ("warm-up s", "{warmup_seconds:.2f}"), ("peak RSS MB", "{peak_rss_mb:.0f}"),
           ("RSS increase MB", "{rss_increase_mb:.0f}"), ("peak device MB", "{peak_device_mb:.0f}"),
           ("cores used", "{cores_used:.2f}"), ("load 1 min", "{load_average_1m:.2f}"))


def prepare(args, tokenizer) -> tuple[dict, dict]:
    """(settings, payload): the texts, their buckets and rows per batch, and the tokens each
    framework computes. The batching call sites (Embedder's plan) are here."""
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


def runs(settings: dict) -> dict:
    """One run a framework, keyed by the framework."""
    return {f: (f, {}) for f in FRAMEWORKS}


def model_flops(job: dict, cfg: dict, result: dict) -> tuple[int, int, list[str]]:
    """(model FLOPs, tokens) of the timed run, and the formula."""
    return sum(forward_flops(cfg, n) for n in job["lengths"]), job["tokens"], [FORWARD_FORMULA]


def summarize(results: dict) -> tuple[dict, list[str]]:
    """The tokens/s ratio, and how far the first embeddings of the two frameworks are apart."""
    first = {f: np.asarray(results[f].pop("first_embeddings")) for f in results}
    if "torch" not in results:
        return {}, []
    ratio, ratio_text = speed_ratio(results["jax"], results["torch"])
    summary = {**ratio, "max_abs_diff_first": float(np.abs(first["jax"] - first["torch"]).max())}
    return summary, [f"JAX / PyTorch tokens/s ratio: {ratio_text}",
                     f"max |jax - torch| on first {len(first['jax'])} embeddings: {summary['max_abs_diff_first']:.2e}"]
