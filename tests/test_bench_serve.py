"""`diffemb bench serve` end to end on a tiny random LLaMA: a real server process under the bounded
load, the offline Embedder and the sentence-transformers loop; every row of the table, the counts
asked for, positive figures. (Speed itself is a benchmark's business, not a test's.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402
from diffemb_jax import cli  # noqa: E402
from diffemb_jax.bench.serve import LOOP, OFFLINE, SERVED, WORKLOADS  # noqa: E402


def test_bench_serve_tiny_model(tmp_path, capsys):
    model_dir = tiny.write_checkpoint("llama", tmp_path / "llama")
    out = tmp_path / "serve.json"
    assert cli.main(["bench", "serve", "--model", str(model_dir), "--queries", "24", "--concurrency", "8",
                     "--bursts", "3", "--burst-size", "8", "--burst-concurrency", "2", "--max-length", "32",
                     "--batch-size", "4", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["results"]
    assert set(rows) == {f"{who}, {name}" for who in (SERVED, OFFLINE, LOOP) for name in WORKLOADS}
    asked = {"queries": (24, 24, 8), "documents": (3, 24, 2)}  # requests, texts, in flight
    for name, (requests, texts, in_flight) in asked.items():
        served, offline, loop = (rows[f"{who}, {name}"] for who in (SERVED, OFFLINE, LOOP))
        assert (served["requests"], served["texts"], served["concurrency"]) == (requests, texts, in_flight)
        assert served["failures"] == 0 and served["requests_asked"] == requests
        assert offline["texts"] == loop["texts"] == texts and loop["requests"] == requests
        # the server counts the same tokens as the bench does
        assert served["tokens"] == offline["tokens"] == report["settings"]["tokens"][name] > 0
        for row in (served, offline, loop):
            assert row["texts_per_s"] > 0 and row["tokens_per_s"] > 0 and row["vs_offline"] > 0
        for row in (served, loop):
            assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert served["server_cpu_ms_per_request"] >= 0
        assert report["batching_efficiency"][name] == served["vs_offline"]
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)  # the header and a line a row
    assert all(any(line.startswith(f"| {key} |") for line in table) for key in rows)
    assert "batching efficiency, queries" in printed


def test_bench_serve_refuses_bad_flags(capsys):
    assert cli.main(["bench", "serve", "--burst-size", "0"]) == 2
    assert "--burst-size must be positive" in capsys.readouterr().err
    assert cli.main(["bench", "serve", "--profile", "prof"]) == 2
    assert "takes no --profile" in capsys.readouterr().err
