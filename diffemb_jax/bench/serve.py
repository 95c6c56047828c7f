"""`diffemb bench serve`: is the server as fast as `diffemb encode` on the same texts?

`diffemb serve` is started as a process of its own on 127.0.0.1 (a free port) for the model, and,
once it answers /health (its warm-up compiled every batch shape), load.py sends two workloads to
/v1/embeddings, each first a little untimed (connections opened), then timed: --queries requests of
one short text each (a docstring's first sentence, at most 32 tokens), --concurrency in flight; and
--bursts requests of --burst-size documents each (docstrings, at most --max-length tokens),
--burst-concurrency in flight. Each stops at its request count or after --duration seconds, whichever
comes first. Then the server is stopped, and a worker process encodes each workload's texts offline
with the Embedder as `diffemb encode` runs it (all at once, after an untimed pass); the served
texts/s over the offline texts/s is the batching efficiency (the target is 0.8 or more). With
--vs-torch (the default), where sentence-transformers is installed, another worker encodes the same
requests with it (models.Transformer + mean Pooling + Normalize over the same weights), one request
after the other: a server that does not batch requests together. All on one machine: the load, the
server and the references share its cores, one after the other.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from diffemb_jax.batching import PACK_LENGTH
from diffemb_jax.bench.compare import package_versions, parent_preallocation_off, spawn_worker
from diffemb_jax.bench.corpus import docstrings, fit, make_texts, token_count
from diffemb_jax.bench.flags import check, command_line
from diffemb_jax.bench.load import percentiles_ms, run_load
from diffemb_jax.bench.report import table
from diffemb_jax.bench.shapes import bench_model, tokenizer_for, torch_source
from diffemb_jax.embedding.files import write_json_atomic
from diffemb_jax.evaluation.stdlib_task import first_sentence
from diffemb_jax.errors import ConfigError

WORKLOADS = ("queries", "documents")
QUERY_TOKENS = 32
TARGET = 0.8  # served / offline texts/s
COLUMNS = (("requests", "{requests}"), ("in flight", "{concurrency}"), ("texts", "{texts}"),
           ("texts/s", "{texts_per_s:.1f}"), ("tokens/s", "{tokens_per_s:.0f}"), ("p50 ms", "{p50_ms:.1f}"),
           ("p95 ms", "{p95_ms:.1f}"), ("p99 ms", "{p99_ms:.1f}"), ("/ offline", "{vs_offline:.2f}"),
           ("server CPU ms/request", "{server_cpu_ms_per_request:.2f}"))
SERVED, OFFLINE, LOOP = "diffemb serve", "diffemb encode (offline)", "sentence-transformers loop"


def queries(tokenizer, n: int, max_length: int) -> list[str]:
    """n distinct short texts: docstrings' first sentences, at most QUERY_TOKENS tokens."""
    length = min(QUERY_TOKENS, max_length)
    found = dict.fromkeys(filter(None, (fit(tokenizer, first_sentence(doc, name), length)
                                        for doc, name in docstrings().items())))
    if len(found) < n:
        raise ConfigError(f"--queries {n}: there are only {len(found)} distinct queries to bench with")
    return list(itertools.islice(found, n))


def workloads(args, tokenizer) -> dict[str, list[list[str]]]:
    """Each workload's requests, each a list of texts."""
    docs = make_texts(tokenizer, args.bursts * args.burst_size, args.max_length)
    return {"queries": [[q] for q in queries(tokenizer, args.queries, args.max_length)],
            "documents": [docs[i : i + args.burst_size] for i in range(0, len(docs), args.burst_size)]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc: Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Server:
    """`diffemb serve` in a process of its own, its output in a log file."""

    def __init__(self, model: Path, args, log: Path):
        self.port, self.log = _free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        flags = ["--max-length", args.max_length, "--batch-size", args.batch_size, "--max-batch-tokens",
                 args.max_batch_tokens, "--max-wait-ms", args.max_wait_ms, "--dtype", args.dtype,
                 "--max-inputs", args.burst_size,
                 "--max-queue", max(8192, args.concurrency + args.burst_size * args.burst_concurrency)]
        with log.open("w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "diffemb_jax.cli", "serve", "--model", str(model),
                                          "--host", "127.0.0.1", "--port", str(self.port), *map(str, flags)],
                                         stdout=out, stderr=subprocess.STDOUT)

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"diffemb bench serve: the server exited ({self.proc.returncode}):\n{self._tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"diffemb bench serve: the server did not answer /health in {timeout:.0f} s (more: "
                         f"--startup-timeout):\n{self._tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


def _served(server: _Server, requests: list[list[str]], concurrency: int, args) -> dict:
    """One workload on the server: an untimed start (one request per connection), then all of it."""
    run_load(server.url, requests[:concurrency], concurrency=concurrency, duration_s=args.duration,
             encoding_format=args.encoding_format)
    cpu = _cpu_seconds(server.proc.pid)
    result = run_load(server.url, requests, concurrency=concurrency, duration_s=args.duration,
                      encoding_format=args.encoding_format)
    result["server_cpu_ms_per_request"] = (_cpu_seconds(server.proc.pid) - cpu) * 1000 / max(result["requests"], 1)
    return result


def _sentence_transformers_missing(args) -> str | None:
    if not args.vs_torch:
        return "--no-vs-torch"
    if importlib.util.find_spec("sentence_transformers") is None:
        return "sentence-transformers is not installed (pip install sentence-transformers)"
    return None


def main(args) -> dict:
    """`diffemb bench serve`: the bench printed, and returned (also written to --json)."""
    check(args)
    report = bench_serve(args)
    if args.json:
        write_json_atomic(Path(args.json), report)
        print(f"wrote {args.json}")
    return report


def bench_serve(args) -> dict:
    """Serve, load, stop; the offline references; the table and summary printed; the report."""
    with tempfile.TemporaryDirectory(prefix="diffemb-bench-serve-") as tmp, parent_preallocation_off() as env:
        tmp = Path(tmp)
        model = bench_model(args, tmp)
        tokenizer = tokenizer_for(model)
        work = workloads(args, tokenizer)
        tokens = {name: token_count(tokenizer, [t for r in reqs for t in r], args.max_length)
                  for name, reqs in work.items()}
        settings = {"model": str(model), "shape": args.shape, "dtype": args.dtype, "max_length": args.max_length,
                    "batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens or None,
                    "max_wait_ms": args.max_wait_ms, "encoding_format": args.encoding_format,
                    "requests": {name: len(reqs) for name, reqs in work.items()}, "tokens": tokens,
                    "versions": package_versions(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
        print(f"command: {command_line(args)}")
        print("settings: " + json.dumps(settings), flush=True)
        server = _Server(model, args, tmp / "server.log")
        try:
            print(f"starting diffemb serve on {server.url} ...", flush=True)
            server.wait(args.startup_timeout)
            served = {"queries": _served(server, work["queries"], args.concurrency, args),
                      "documents": _served(server, work["documents"], args.burst_concurrency, args)}
        finally:
            server.stop()
        tokenizer.save(str(tmp / "tokenizer.json"))
        job = {"what": "serve", "model": str(model), "dtype": args.dtype, "mesh": None, "max_length": args.max_length,
               "scan_layers": False,  # as the server runs the decoder
               "batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens or None,
               "pack_length": PACK_LENGTH, "workloads": work, "tokens": tokens, "tokenizer": str(tmp / "tokenizer.json")}
        offline = spawn_worker(OFFLINE, "jax", job, tmp / "jax.json", env)
        skipped, loop = {}, None
        reason = _sentence_transformers_missing(args)
        if reason is None:
            try:
                loop = spawn_worker(LOOP, "torch", {**job, "torch_source": str(torch_source(model)),
                                              "folder": str(tmp / "sentence-transformers")}, tmp / "torch.json", env)
            except SystemExit as e:  # the model is one sentence-transformers cannot load: said, not fatal
                reason = f"its worker failed: {e}"
        if reason is not None:
            skipped[LOOP] = reason
        settings["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results = _rows(served, offline, loop)
    efficiency = {name: served[name]["texts_per_s"] / offline[name]["texts_per_s"] for name in WORKLOADS}
    lines = [f"batching efficiency, {name}: served / offline texts/s {value:.2f} (target >= {TARGET})"
             for name, value in efficiency.items()]
    lines += [f"{SERVED}, {name}: {r['failures']} failed requests, the first: {r['first_failure']}"
              for name, r in served.items() if r["failures"]]
    lines += [f"{SERVED}, {name}: {r['requests']} of {r['requests_asked']} requests sent in --duration "
              f"{args.duration:g} s" for name, r in served.items() if r["requests"] < r["requests_asked"]]
    lines += [f"{key}: not run, {why}" for key, why in skipped.items()]
    lines.append(f"offline and loop on {offline['device']}; load average (1, 5, 15 min) at start "
                 f"{settings['load_average_at_start']}, at end {settings['load_average_at_end']}")
    print("\n" + table(results, COLUMNS) + "\n")
    print("\n".join(lines))
    return {"command": command_line(args), "settings": settings, "results": results, "skipped": skipped,
            "batching_efficiency": efficiency}


def _rows(served: dict, offline: dict, loop: dict | None) -> dict:
    """The table's rows: per workload, served, offline and (where run) the sentence-transformers loop."""
    empty = dict.fromkeys(("requests", "concurrency", "p50_ms", "p95_ms", "p99_ms", "server_cpu_ms_per_request"))
    rows = {}
    for name in WORKLOADS:
        base = offline[name]["texts_per_s"]
        rows[f"{SERVED}, {name}"] = {**served[name], "vs_offline": served[name]["texts_per_s"] / base}
        rows[f"{OFFLINE}, {name}"] = {**empty, **_timing(offline[name]), "vs_offline": 1.0}
        if loop is not None:
            latencies = loop[name]["latencies"]
            rows[f"{LOOP}, {name}"] = {**empty, **_timing(loop[name]), "requests": len(latencies), "concurrency": 1,
                                       **percentiles_ms(latencies), "vs_offline": loop[name]["texts_per_s"] / base}
    return rows


def _timing(result: dict) -> dict:
    return {key: result[key] for key in ("texts", "tokens", "seconds", "texts_per_s", "tokens_per_s")}
