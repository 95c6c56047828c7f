"""A bench run in its worker process, the same for both frameworks: load, warm up, time, and
write the result for the parent. `side` is the framework's module (jax_side or torch_reference),
picked by __main__.py so that a worker imports only its own framework."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from diffemb_jax.batching import SIDES
from diffemb_jax.bench.measure import compile_seconds, measure

COMPARED = 4  # embeddings of the first texts sent back to compare the two frameworks


def run_worker(side, job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    side.compilations()  # counted from the start: loading, ahead-of-time compilation, warm-up
    result = {"framework": side.FRAMEWORK, **WORK[job["what"]](side, job)}
    Path(out_path).write_text(json.dumps(result))


def encode_worker(side, job: dict) -> dict:
    """Load, encode all the texts once untimed (warm-up: every batch shape compiled), then once timed."""
    encode, device, info = side.encoder(job)
    figures, _, vectors = measure(side, lambda: encode(job["texts"]), lambda: encode(job["texts"]))
    if job.get("profile"):
        figures["profile"] = side.profiled(lambda: encode(job["texts"]), job["profile"])
    return {"device": device, **info, "compile_seconds": compile_seconds(side, figures),
            "tokens": job["tokens"], "texts": len(job["texts"]),
            "computed_tokens": job["computed_tokens"][side.FRAMEWORK], **figures,
            "tokens_per_s": job["tokens"] / figures["seconds"],
            "texts_per_s": len(job["texts"]) / figures["seconds"],
            "first_embeddings": vectors[:COMPARED].tolist()}


def out_of_memory(error: BaseException) -> bool:
    """An allocation that failed: XLA's RESOURCE_EXHAUSTED, torch's OutOfMemoryError (CUDA) or its
    CPU allocator's refusal. Anything else is a real error."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "can't allocate memory" in text


def long_worker(side, job: dict) -> dict:
    """One document of job["length"] tokens, batch 1: warm up (compile) once, then time once."""
    length = job["length"]
    logging.getLogger("diffemb_jax.embedding.embedder").setLevel(logging.ERROR)  # no truncation notes
    single = {**job, "max_length": length, "batch_size": 1, "max_batch_tokens": None, "pack_length": 0,
              "buckets": [length], "bucket_rows": [1]}
    encode, device, info = side.encoder(single)
    text = job["documents"][str(length)]
    result = {"device": device, **info, "length": length, "tokens": job["document_tokens"][str(length)]}
    try:
        figures, _, vectors = measure(side, lambda: encode([text]), lambda: encode([text]))
    except Exception as error:  # noqa: BLE001 - out of memory is a result here; anything else is raised
        if not out_of_memory(error):
            raise
        first_line = next(iter(str(error).strip().splitlines()), type(error).__name__)
        return {**result, "status": "out of memory", "error": first_line[:500],
                **dict.fromkeys(("seconds", "warmup_seconds", "compile_seconds", "tokens_per_s", "peak_rss_mb",
                                 "timed_peak_rss_mb", "rss_increase_mb", "peak_device_mb", "timed_peak_device_mb"))}
    if job.get("profile"):
        figures["profile"] = side.profiled(lambda: encode([text]), job["profile"])
    return {**result, "status": "ok", **figures, "compile_seconds": compile_seconds(side, figures),
            "tokens_per_s": result["tokens"] / figures["seconds"],
            "embedding": vectors[0].tolist()}


def serve_worker(side, job: dict) -> dict:
    """`bench serve`'s references on each workload's texts: JAX the Embedder as `diffemb encode` runs
    it, all the texts in one call, once untimed (every batch shape compiled), then once timed;
    PyTorch sentence-transformers, one call per request in turn (a server that does not batch
    requests together), a warm-up of two requests first. Latencies: per request (PyTorch)."""
    if side.FRAMEWORK == "jax":
        encode, device, info = side.encoder(job)
    else:
        encode, device, info = side.sentence_transformer(job, Path(job["folder"]))
    result = {"device": device, **info}
    for name, requests in job["workloads"].items():
        texts = [text for request in requests for text in request]
        if side.FRAMEWORK == "jax":
            figures, _, _ = measure(side, lambda: encode(texts), lambda: encode(texts))
            latencies = None
        else:
            figures, _, latencies = measure(side, lambda: [encode(r) for r in requests[:2]],
                                            lambda: [_timed(encode, r) for r in requests])
        result[name] = {**figures, "requests": len(requests), "texts": len(texts), "tokens": job["tokens"][name],
                        "texts_per_s": len(texts) / figures["seconds"],
                        "tokens_per_s": job["tokens"][name] / figures["seconds"], "latencies": latencies}
    return result


def _timed(encode, texts) -> float:
    start = time.perf_counter()
    encode(texts)
    return time.perf_counter() - start


def train_worker(side, job: dict) -> dict:
    """Load, run --warmup-steps steps, then time --steps steps, all on the same batch."""
    step, device, info = side.trainer(job)
    warmup, steps = job["warmup_steps"], job["steps"]
    info["computed_tokens"] = job["computed_tokens"][side.FRAMEWORK]
    figures, warm_losses, losses = measure(side, lambda: [step(i) for i in range(warmup)],
                                           lambda: [step(i) for i in range(warmup, warmup + steps)])
    losses = warm_losses + losses
    if job.get("profile"):  # one step more, its loss not among the timed ones
        figures["profile"] = side.profiled(lambda: step(warmup + steps), job["profile"])
    return {"device": device, **info, "remat": job["remat"], "dtype": job["dtype"],
            "grad_cache_chunk": job["grad_cache_chunk"] if side.FRAMEWORK == "jax" else 0,
            "tokens_per_step": job["tokens_per_step"], **figures,
            "step_seconds": figures["seconds"] / steps,
            "tokens_per_s": job["tokens_per_step"] * steps / figures["seconds"],
            "texts_per_s": len(SIDES) * len(job["batch"]["query"]["input_ids"]) * steps / figures["seconds"],
            "losses": losses, "first_loss": losses[0], "last_loss": losses[-1]}


WORK = {"encode": encode_worker, "train": train_worker, "long": long_worker, "serve": serve_worker}  # by the job's kind
