"""`diffemb reproduce small --budget tiny` end to end on a tiny model: every row and seed trained and
scored, the table in the paper's layout, adaptation measured, and a rerun that reuses every stage."""

from __future__ import annotations

import contextlib
import io
import json

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

import tiny
from diffemb_jax import reproduce
from diffemb_jax.training.adapt import Adaptation


@contextlib.contextmanager
def persistent_compilation_cache(directory):
    """JAX's persistent cache in `directory`, as `diffemb reproduce` has it (the CLI turns it on): the
    runs that compile the same step (each seed; rows (b)-(d)) compile it once. And XLA's optimisations
    mostly off: on a tiny model compiling is the run's cost (half of it lowered to machine code with
    LLVM's full optimisation), and the test is about the stages, not their speed. Everything back after."""
    settings = {"jax_enable_compilation_cache": True, "jax_compilation_cache_dir": str(directory),
                "jax_persistent_cache_min_compile_time_secs": 0.0, "jax_disable_most_optimizations": True}
    before = {name: jax.config.values[name] for name in settings}
    compilation_cache.reset_cache()  # the cache is set up once a process, perhaps already (off) here
    for name, value in settings.items():
        jax.config.update(name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def report_and_output(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    model = tiny.write_checkpoint("qwen2", root / "model")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), persistent_compilation_cache(root / "xla"):
        report = reproduce.run("tiny", workdir=root / "work", model=model, progress=False)
    assert any((root / "xla").iterdir())  # the cache was in use
    return report, out.getvalue(), root


def test_every_row_and_seed_is_scored_on_both_held_out_sets(report_and_output):
    report, _, _ = report_and_output
    assert sorted(report["results"]) == ["a", "b", "c", "d"]
    for runs in report["results"].values():
        assert len(runs) == reproduce.BUDGETS["tiny"].seeds
        for run in runs:
            assert set(run["after"]) == {"functions", "whole modules"}
            assert all(0 <= m["ndcg@10"] <= 1 for m in run["after"].values())
    assert report["sizes"]["functions"]["queries"] > 0 and report["sizes"]["whole modules"]["queries"] > 0
    for objective in ("mntp", "diffusion"):
        a = report["adaptation"][objective]
        assert 0 <= a["eval_before"]["eval_accuracy"] <= 1 and 0 <= a["eval_after"]["eval_accuracy"] <= 1


def test_prints_the_table_with_mean_and_spread(report_and_output):
    report, output, _ = report_and_output
    assert "hardware:" in output and report["table"] in output
    lines = report["table"].splitlines()
    assert lines[0] == "| row | model | nDCG@10 functions | nDCG@10 whole modules |"
    row_a = next(line for line in lines if line.startswith("| (a) "))
    values = [r["after"]["functions"]["ndcg@10"] for r in report["results"]["a"]]
    mean = sum(values) / len(values)
    assert f"{mean:.3f} ± " in row_a


def test_train_and_test_packages_are_apart_and_torch_is_in_neither(report_and_output):
    report, _, _ = report_and_output
    train, test = set(report["packages"]["train"]), set(report["packages"]["test"])
    assert train and test and not train & test
    assert not any(p.startswith("torch") for p in train | test)


def test_a_rerun_reuses_every_stage(report_and_output, monkeypatch):
    report, _, root = report_and_output
    monkeypatch.setattr(reproduce, "fine_tune_and_score", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(Adaptation, "run", lambda self: pytest.fail("adapted again"))
    with contextlib.redirect_stdout(io.StringIO()):
        again = reproduce.run("tiny", workdir=root / "work", model=root / "model", progress=False)
    assert again["table"] == report["table"]
    assert json.loads((root / "work" / "results.json").read_text())["table"] == report["table"]
