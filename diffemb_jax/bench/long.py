"""`diffemb bench long`, the parent's part: a document at each length, each framework's lengths
shortest first, the rule that stops a framework before a length it cannot run, and the comparison."""

from __future__ import annotations

import numpy as np

from diffemb_jax.bench.corpus import long_document
from diffemb_jax.bench.flags import lengths_of
from diffemb_jax.bench.flops import FORWARD_FORMULA, forward_flops
from diffemb_jax.bench.report import FRAMEWORKS
from diffemb_jax.memory import available_host_mb

COLUMNS = (("device", "{device}"), ("length", "{length}"), ("tokens", "{tokens}"), ("status", "{status}"),
           ("seconds", "{seconds:.2f}"), ("tokens/s", "{tokens_per_s:.0f}"),
           ("model TFLOP/s", "{model_tflops_per_s:.3f}"), ("compile s", "{compile_seconds:.2f}"),
           ("warm-up s", "{warmup_seconds:.2f}"),
           ("peak device MB", "{peak_device_mb:.0f}"), ("peak RSS MB", "{peak_rss_mb:.0f}"),
           ("RSS increase MB", "{rss_increase_mb:.0f}"), ("load 1 min", "{load_average_1m:.2f}"))


def prepare(args, tokenizer) -> tuple[dict, dict]:
    """(settings, payload): the document of each length, and its tokens."""
    lengths = lengths_of(args.lengths)
    documents = {str(n): long_document(tokenizer, n) for n in lengths}
    tokens = {n: len(tokenizer.encode(text).ids) for n, text in documents.items()}
    settings = {"lengths": lengths, "document_tokens": tokens, "batch_size": 1, "dtype": args.dtype,
                "time_limit": args.time_limit, "attention": "bidirectional", "pooling": "mean"}
    return settings, {"documents": documents}


def runs(settings: dict) -> dict:
    """Each framework at each length, shortest first; JAX first."""
    return {f"{FRAMEWORKS[f]} {n}": (f, {"length": n}) for f in FRAMEWORKS for n in settings["lengths"]}


def _quadratic_guess(points: list[tuple[int, float]], length: int) -> float:
    """The last value plus the last increase scaled as length squared: growth is at most quadratic
    in length (attention), so this errs high."""
    (a, fa), (b, fb) = points[-2:]
    return fb + max(fb - fa, 0.0) * (length * length - b * b) / (b * b - a * a)


def skip(framework: str, changes: dict, results: dict, settings: dict) -> str | None:
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


def model_flops(job: dict, cfg: dict, result: dict) -> tuple[int, int, list[str]]:
    return forward_flops(cfg, result["tokens"]), result["tokens"], [FORWARD_FORMULA]


def summarize(results: dict) -> tuple[dict, list[str]]:
    """Each framework's longest length run, and by length the tokens/s ratio and how far the two
    embeddings are apart."""
    ran = {f: [r for r in results.values() if r["framework"] == f and r["status"] == "ok"]
           for f in FRAMEWORKS if any(r["framework"] == f for r in results.values())}
    longest = {f: max((r["length"] for r in ok), default=None) for f, ok in ran.items()}
    lines = []
    for f, ok in ran.items():
        if not ok:
            lines.append(f"{FRAMEWORKS[f]}: no length ran")
            continue
        best = max(ok, key=lambda r: r["length"])
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
