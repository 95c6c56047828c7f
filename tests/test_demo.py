"""`diffemb demo`'s flow (task -> eval subset -> adapt once -> train each row -> evaluate merged model ->
table, all kept in the workdir) with tiny settings on a tiny random Qwen2; the real SmolLM2 demo is
run by hand, not here."""

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest

import tiny
from diffemb_jax import demo
from diffemb_jax.embedding import Embedder
from diffemb_jax.evaluation import held_out
from diffemb_jax.evaluation.held_out import eval_subset
from diffemb_jax.evaluation.stdlib_task import build_stdlib_task

TINY = dict(eval_queries=8, eval_docs=16, query_max_length=16, doc_max_length=24, steps=6, global_batch_size=8,
            lr=1e-2, warmup_steps=1, lora_rank=4, lora_alpha=8.0, encode_batch_size=8, adapt_steps=2, adapt_batch=4,
            adapt_length=32, progress=False)


def _run(settings):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        results = demo.run(settings)
    return results, out.getvalue()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    model = tiny.write_checkpoint("qwen2", root / "model")
    settings = demo.Settings(model=str(model), workdir=str(root / "work"), rows=("a", "b", "d"), **TINY)
    results, output = _run(settings)
    return results, output, settings


def test_before_and_after_for_every_row(demo_run):
    results, _, _ = demo_run
    assert list(results) == ["a", "b", "d"]
    assert [r["attention"] for r in results.values()] == ["causal", "bidirectional", "bidirectional"]
    for r in results.values():
        for when in ("before", "after"):
            for metric in ("ndcg@10", "mrr@10"):
                assert 0.0 <= r[when][metric] <= 1.0, (when, metric, r[when][metric])
        assert r["steps"] == TINY["steps"] and r["train_seconds"] > 0


def test_training_improves_retrieval_in_at_least_one_row(demo_run):
    results, _, _ = demo_run
    gains = {key: r["after"]["ndcg@10"] - r["before"]["ndcg@10"] for key, r in results.items()}
    assert max(gains.values()) > 0, gains


def test_prints_the_table_task_sizes_and_how_to_encode(demo_run):
    results, output, _ = demo_run
    assert "| row | model | nDCG@10 before | nDCG@10 after |" in output
    for key in ("a", "b", "d"):
        assert f"| ({key}) | {results[key]['label']} |" in output
    assert "8 queries, 16 documents" in output and "train triplets" in output
    assert "| diffusion |" in output  # the adaptation's own line
    assert "diffemb encode --model " in output and " --adapter " in output


def test_the_workdir_keeps_the_adapted_model_and_each_rows_adapter(demo_run):
    results, _, settings = demo_run
    adapted = results["d"]["model"]
    assert adapted.parent.name == "adapt-diffusion" and (adapted / "diffemb.json").exists()
    assert results["a"]["model"] == results["b"]["model"] == Path(settings.model)
    for r in results.values():
        assert (r["adapter"] / "adapter_config.json").exists()
    config = json.loads((results["d"]["adapter"] / "adapter_config.json").read_text())
    assert config["r"] == TINY["lora_rank"]
    # what the printed command does: the kept model + adapter encode (and differ from the base model)
    texts = ["def add(a, b): return a + b", "read a file into a string"]
    kept = Embedder.from_pretrained(str(adapted), adapter=str(results["d"]["adapter"]), attention="bidirectional",
                                    max_length=24).encode(texts)
    plain = Embedder.from_pretrained(str(adapted), attention="bidirectional", max_length=24).encode(texts)
    assert kept.shape == plain.shape and np.all(np.isfinite(kept))
    assert not np.allclose(kept, plain, atol=1e-4)


def test_a_rerun_reuses_the_adapted_model_and_retrains_the_rows(demo_run, monkeypatch):
    results, _, settings = demo_run
    monkeypatch.setattr(held_out, "Adaptation", lambda *a, **k: pytest.fail("adapted again"))
    again, _ = _run(dataclasses.replace(settings, rows=("d",)))
    assert list(again) == ["d"] and again["d"]["model"] == results["d"]["model"]
    assert again["d"]["before"] == results["d"]["before"]  # the same adapted model, the same seeded subset
    assert (again["d"]["adapter"] / "adapter_config.json").exists()


def test_unknown_rows_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="demo rows must be among"):
        demo.run(demo.Settings(workdir=str(tmp_path), rows=("a", "z")))
    assert not (tmp_path / "train.jsonl").exists()


def test_eval_subset_keeps_relevant_documents_and_is_seeded():
    test = build_stdlib_task().test
    subset = eval_subset(test, 20, 50, seed=3)
    assert len(subset.queries) == 20 and len(subset.corpus) == 50
    assert all(d in subset.corpus for judged in subset.qrels.values() for d in judged)
    assert subset == eval_subset(test, 20, 50, seed=3)
    assert subset != eval_subset(test, 20, 50, seed=4)
    everything = eval_subset(test, 10**6, 10**6, seed=0)
    assert everything.corpus == test.corpus and everything.qrels == test.qrels


def test_default_settings_are_the_demo_recipe():
    s = demo.DEFAULT_SETTINGS
    assert s.rows == ("a", "d") and s.model is None and s.workdir is None
    assert s.eval_queries >= 100 and s.eval_docs >= 200
    assert dataclasses.replace(s, steps=3).steps == 3
