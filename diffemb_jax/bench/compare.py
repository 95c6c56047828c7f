"""`diffemb bench encode|train|long`, the parent (serve.py is `bench serve`'s): each run in a worker
process of its own, one after the other (so the peak memory each reports is its own), then the
table, the summary and the report; or, `long --compile-only`, the plan of plan.py."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from diffemb_jax.bench.flags import check, command_line
from diffemb_jax.bench.flops import flops_summary
from diffemb_jax.bench.kinds import KINDS, Kind
from diffemb_jax.bench.plan import long_plan
from diffemb_jax.bench.report import device_mismatch, label, table
from diffemb_jax.bench.shapes import bench_model, tokenizer_for, torch_source
from diffemb_jax.embedding.files import write_json_atomic


def main(args) -> dict:
    """Bench each run in turn (or, --compile-only, plan each length), print the comparison, and return
    it (also written to --json)."""
    check(args)
    report = long_plan(args) if args.what == "long" and args.compile_only else compare(args, KINDS[args.what])
    if args.json:
        write_json_atomic(Path(args.json), report)
        print(f"wrote {args.json}")
    return report


def compare(args, kind: Kind) -> dict:
    """Each run of `kind` in a worker of its own, in turn; the table and summary printed; the report."""
    with tempfile.TemporaryDirectory(prefix="diffemb-bench-") as tmp, parent_preallocation_off() as worker_env:
        model = bench_model(args, Path(tmp))
        tokenizer = tokenizer_for(model)
        settings, payload = kind.prepare(args, tokenizer)
        settings = {"model": str(model), "shape": args.shape, "vs_torch": args.vs_torch,
                    "scan_layers": args.scan_layers,
                    "torch_source": str(torch_source(model)) if args.vs_torch else None, **settings,
                    "versions": package_versions(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
        print(f"command: {command_line(args)}")
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
            results[key] = spawn_worker(key, framework, {**job, **changes}, Path(tmp) / f"job{i}.json", worker_env)
    summary, lines = kind.summarize(results)
    lines += [f"{key}: not run, {reason}" for key, reason in skipped.items()]
    flops, flops_lines = flops_summary(kind, job, results, args.peak_tflops)
    mismatch = device_mismatch(results)
    report = {"command": command_line(args), "settings": settings, "results": results, "skipped": skipped, **summary,
              **flops, "device_mismatch": mismatch}
    lines = ([mismatch] if mismatch else []) + lines
    lines += [f"{label(key)} compiled {result['timed_compiles']} XLA programs in its timed part: its time "
              "includes compilation" for key, result in results.items() if result.get("timed_compiles")]
    lines += [f"{label(key)}: profile of one more untimed pass in {result['profile']['profile_dir']}"
              for key, result in results.items() if result.get("profile")]
    print("\n" + table(results, kind.columns) + "\n")
    print("\n".join(lines + flops_lines))
    return report


PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"


@contextlib.contextmanager
def parent_preallocation_off():
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


def spawn_worker(key: str, framework: str, job: dict, job_path: Path, env: dict) -> dict:
    """One run in a child process of its own, so that the peak memory it reports is its own."""
    out_path = job_path.with_suffix(".out.json")
    job_path.write_text(json.dumps(job))
    cmd = [sys.executable, "-m", "diffemb_jax.bench", "--worker", framework, str(job_path), str(out_path)]
    print(f"running the {label(key)} worker ...", flush=True)
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise SystemExit(f"diffemb bench: the {label(key)} worker failed (exit status {rc}); its error is above")
    return json.loads(out_path.read_text())


def _folder_name(key: str) -> str:
    """A run's profile folder: its label, spaces and signs other than = . - _ made dashes."""
    return re.sub(r"[^A-Za-z0-9=._-]+", "-", label(key))


def package_versions() -> dict:
    """The installed versions of the software both sides run on."""
    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions
