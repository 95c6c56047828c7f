"""`diffemb bench encode`: is encoding with JAX faster, and lighter, than the PyTorch reference?

Both frameworks embed the same texts (standard-library docstrings, cut to at most --max-length
tokens) with the same weights, tokens, batch size and bucket lengths, bidirectional attention and
mean pooling. Each runs in a child process of its own, one after the other, so the peak memory
reported is that framework's alone. Memory figures read /proc, so they are Linux-only.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Modules whose public docstrings make the texts: real prose and code, from a line to pages long.
DOC_MODULES = ("json", "re", "textwrap", "itertools", "functools", "collections", "inspect", "pathlib",
               "subprocess", "threading", "argparse", "logging", "random", "statistics", "string",
               "tempfile", "zipfile", "tarfile", "csv", "datetime", "heapq", "bisect", "difflib",
               "email.message", "urllib.parse", "http.client", "socket", "typing", "asyncio", "unittest",
               "decimal", "fractions", "math", "os", "shutil")
FRAMEWORKS = {"jax": "JAX", "torch": "PyTorch"}
COMPARED = 4  # embeddings of the first texts sent back to compare the two frameworks


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


def warmup_texts(tokenizer, texts: list[str], buckets: list[int]) -> list[str]:
    """One text for each bucket length the texts use, so that warming up meets every shape."""
    first = {}
    for text, enc in zip(texts, tokenizer.encode_batch(texts)):
        first.setdefault(next(b for b in buckets if b >= len(enc.ids)), text)
    return list(first.values())


# ----------------------------------------------------------------------------- models


def tokenizer_for(model: Path):
    """The tokenizer that load_model gives the Embedder, without reading any weights."""
    from conversion.checkpoint import hf_tokenizer

    return hf_tokenizer(model.parent, model.name) if model.suffix == ".gguf" else hf_tokenizer(model)


def torch_source(model: Path) -> Path:
    """The weights transformers can load: the model itself, or what a converted directory came from."""
    from conversion import is_converted
    from conversion.checkpoint import CONVERTED_MARKER

    if not is_converted(model):
        return model
    source = json.loads((model / CONVERTED_MARKER).read_text()).get("source", "")
    if not source or not Path(source).exists():
        raise FileNotFoundError(f"{model} was converted from {source!r}, which is gone; the PyTorch reference "
                                "needs those original weights: pass the HF directory or .gguf as --model")
    return Path(source)


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


def _jax_encoder(job: dict):
    import jax

    from diffemb_jax.embedding import Embedder

    embedder = Embedder.from_pretrained(job["model"], attention="bidirectional", dtype=job["dtype"],
                                        max_length=job["max_length"], batch_size=job["batch_size"])
    return lambda texts: embedder.encode(texts, progress=False), jax.default_backend()


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


def _torch_model(source: Path, dtype: str):
    import torch
    from transformers import AutoModel

    if source.suffix == ".gguf":
        return _torch_gguf_model(source, getattr(torch, dtype)).eval()
    return AutoModel.from_pretrained(str(source), dtype=getattr(torch, dtype), attn_implementation="sdpa").eval()


def _torch_embed(model, input_ids, padding):
    """Bidirectional attention via a 4-D boolean mask [B, 1, L, L]; mean pooling; L2 normalisation."""
    import torch

    positions = (padding.long().cumsum(-1) - 1).clamp(min=0)
    mask = padding[:, None, None, :].expand(-1, 1, input_ids.shape[1], -1)
    hidden = model(input_ids=input_ids, attention_mask=mask, position_ids=positions).last_hidden_state.float()
    weights = padding.float()[..., None]
    return torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)


def _torch_encoder(job: dict):
    """Tokenised, sorted and padded to bucket lengths the way Embedder.encode does it."""
    import tokenizers
    import torch

    torch.set_num_threads(os.cpu_count())
    model = _torch_model(Path(job["torch_source"]), job["dtype"])
    tokenizer = tokenizers.Tokenizer.from_file(job["tokenizer"])
    batch_size, buckets, max_length = job["batch_size"], job["buckets"], job["max_length"]

    @torch.inference_mode()
    def encode(texts):
        ids = [enc.ids[:max_length] for enc in tokenizer.encode_batch(texts)]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = torch.zeros(len(ids), model.config.hidden_size)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            length = next(b for b in buckets if b >= max(len(ids[i]) for i in rows))
            input_ids = torch.zeros(len(rows), length, dtype=torch.long)
            padding = torch.zeros(len(rows), length, dtype=torch.bool)
            for r, i in enumerate(rows):
                input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
                padding[r, : len(ids[i])] = True
            out[rows] = _torch_embed(model, input_ids, padding)
        return out.numpy()

    return encode, f"cpu, {torch.get_num_threads()} threads"


def run_worker(framework: str, job_path: str, out_path: str) -> None:
    """Load, warm up (one single-text call per bucket length), then time encoding of all the texts."""
    job = json.loads(Path(job_path).read_text())
    encode, device = {"jax": _jax_encoder, "torch": _torch_encoder}[framework](job)
    start = time.perf_counter()
    for text in job["warmup"]:
        encode([text])
    warmup_seconds = time.perf_counter() - start
    load_peak_kb = _proc_status_kb("VmHWM")
    _reset_peak_rss()
    rss_before_kb = _proc_status_kb("VmRSS")
    start = time.perf_counter()
    vectors = encode(job["texts"])  # numpy: the work is done when it returns
    seconds = time.perf_counter() - start
    encode_peak_kb = _proc_status_kb("VmHWM")
    peak_kb = max(load_peak_kb, encode_peak_kb)
    result = {"device": device, "tokens": job["tokens"], "texts": len(job["texts"]), "seconds": seconds,
              "tokens_per_s": job["tokens"] / seconds, "texts_per_s": len(job["texts"]) / seconds,
              "warmup_seconds": warmup_seconds, "peak_rss_mb": peak_kb / 1024,
              "encode_rss_increase_mb": max(encode_peak_kb - rss_before_kb, 0) / 1024,
              "first_embeddings": vectors[:COMPARED].tolist()}
    Path(out_path).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- parent


def _spawn(framework: str, job_path: Path) -> dict:
    out_path = job_path.with_name(f"{framework}.json")
    cmd = [sys.executable, "-m", "diffemb_jax.bench", "--worker", framework, str(job_path), str(out_path)]
    print(f"running the {FRAMEWORKS[framework]} worker ...", flush=True)
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        raise SystemExit(f"diffemb bench: the {FRAMEWORKS[framework]} worker failed (exit status {rc}); "
                         "its error is above")
    return json.loads(out_path.read_text())


def _command(args) -> str:
    parts = ["diffemb", "bench", args.what]
    for flag, value in (("--model", args.model), ("--texts", args.texts), ("--batch-size", args.batch_size),
                        ("--max-length", args.max_length), ("--dtype", args.dtype), ("--json", args.json)):
        if value is not None:
            parts += [flag, str(value)]
    return " ".join(parts)


def _versions() -> dict:
    return {name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "torch", "transformers")}


def _check_args(args) -> None:
    if min(args.texts, args.batch_size, args.max_length) < 1:
        raise ValueError("--texts, --batch-size and --max-length must be positive")
    if args.json and not Path(args.json).absolute().parent.is_dir():
        raise FileNotFoundError(f"the folder for --json {args.json} does not exist")


def _table(results: dict) -> str:
    lines = ["| framework | device | tokens/s | texts/s | warm-up s | peak RSS MB | RSS increase MB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for framework, r in results.items():
        lines.append(f"| {FRAMEWORKS[framework]} | {r['device']} | {r['tokens_per_s']:.0f} | {r['texts_per_s']:.1f} "
                     f"| {r['warmup_seconds']:.2f} | {r['peak_rss_mb']:.0f} | {r['encode_rss_increase_mb']:.0f} |")
    return "\n".join(lines)


def _write_json_atomic(path: Path, report: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.absolute().parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(args) -> dict:
    """Bench both frameworks in turn, print the comparison, and return it (also written to --json)."""
    import numpy as np

    from diffemb_jax.demo import converted_smollm2
    from diffemb_jax.embedding.embedder import bucket_lengths

    _check_args(args)
    model = Path(args.model) if args.model else converted_smollm2()
    if not model.exists():
        raise FileNotFoundError(f"{model} does not exist")
    tokenizer = tokenizer_for(model)
    texts = make_texts(tokenizer, args.texts, args.max_length)
    buckets = bucket_lengths(args.max_length)
    settings = {"model": str(model), "torch_source": str(torch_source(model)), "texts": len(texts),
                "tokens": token_count(tokenizer, texts, args.max_length), "batch_size": args.batch_size,
                "max_length": args.max_length, "dtype": args.dtype, "buckets": buckets,
                "versions": _versions(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    print(f"command: {_command(args)}")
    print("settings: " + json.dumps(settings))
    with tempfile.TemporaryDirectory(prefix="diffemb-bench-") as tmp:
        tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        job = {**settings, "tokenizer": os.path.join(tmp, "tokenizer.json"), "texts": texts,
               "warmup": warmup_texts(tokenizer, texts, buckets)}
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job))
        results = {framework: _spawn(framework, job_path) for framework in FRAMEWORKS}
    first = {f: np.asarray(results[f].pop("first_embeddings")) for f in FRAMEWORKS}
    report = {"command": _command(args), "settings": settings, "results": results,
              "tokens_per_s_ratio": results["jax"]["tokens_per_s"] / results["torch"]["tokens_per_s"],
              "max_abs_diff_first": float(np.abs(first["jax"] - first["torch"]).max())}
    print("\n" + _table(results))
    print(f"\nJAX / PyTorch tokens/s ratio: {report['tokens_per_s_ratio']:.2f}")
    print(f"max |jax - torch| on first {len(first['jax'])} embeddings: {report['max_abs_diff_first']:.2e}")
    if args.json:
        _write_json_atomic(Path(args.json), report)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "--worker" or sys.argv[2] not in FRAMEWORKS:
        sys.exit("usage: python -m diffemb_jax.bench --worker jax|torch JOB.json OUT.json")
    run_worker(*sys.argv[2:])
