"""`diffemb demo`'s flow (task -> eval subset -> train each mode -> evaluate merged model -> table) with
tiny settings on a tiny random Qwen2; the real SmolLM2 demo is run by hand, not here."""

import contextlib
import dataclasses
import io

import pytest

import tiny
from diffemb_jax import demo
from diffemb_jax.evaluation.held_out import eval_subset
from diffemb_jax.evaluation.stdlib_task import build_stdlib_task

TINY = dict(eval_queries=8, eval_docs=16, query_max_length=16, doc_max_length=24, steps=2, global_batch_size=4,
            lr=1e-3, warmup_steps=1, lora_rank=4, lora_alpha=8.0, encode_batch_size=8, progress=False)


@pytest.fixture(scope="module")
def results_and_output(tmp_path_factory):
    model = tiny.write_checkpoint("qwen2", tmp_path_factory.mktemp("demo") / "model")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        results = demo.run(demo.Settings(model=str(model), **TINY))
    return results, out.getvalue()


def test_before_and_after_for_both_modes(results_and_output):
    results, _ = results_and_output
    assert list(results) == ["bidirectional", "causal"]
    for r in results.values():
        for when in ("before", "after"):
            for metric in ("ndcg@10", "mrr@10"):
                assert 0.0 <= r[when][metric] <= 1.0, (when, metric, r[when][metric])
        assert r["steps"] == 2 and r["train_seconds"] > 0


def test_prints_the_table_and_task_sizes(results_and_output):
    _, output = results_and_output
    assert "| attention | nDCG@10 before | nDCG@10 after |" in output
    assert "| bidirectional |" in output and "| causal |" in output
    assert "8 queries, 16 documents" in output and "train triplets" in output


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
    assert s.modes == ("bidirectional", "causal") and s.model is None
    assert s.eval_queries >= 100 and s.eval_docs >= 200
    assert dataclasses.replace(s, steps=3).steps == 3
