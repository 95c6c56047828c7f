"""`diffemb reproduce small`: the paper's comparison at small scale, on the machine at hand.

The paper's claim is that a decoder pretrained bidirectionally (a masked-diffusion LM) embeds better
than an autoregressive one fine-tuned the same way. Here the autoregressive model is SmolLM2-135M
(bundled), and the bidirectional ones are made from it with `diffemb adapt` on the source of the
installed packages' train split:

  (a) causal, as pretrained                     (c) bidirectional after MNTP (llm2vec's adaptation)
  (b) bidirectional, without adaptation         (d) bidirectional after masked-diffusion adaptation

Each is fine-tuned with one contrastive recipe (LoRA, in-batch InfoNCE, BM25 hard negatives) on
docstring -> code pairs of the train packages, for each seed, and scored by nDCG@10 on packages it
never saw: functions (short documents) and whole modules (long documents, where the paper finds its
largest gap). torch is never read. all-MiniLM-L6-v2 (sentence-transformers) is scored on the same
queries as an outside reference. Every stage is kept in the workdir (the adapted models, each
run's scores), so an interrupted run picks up where it stopped; `--budget` trades time for quality.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from diffemb_jax import assets, atomic
from diffemb_jax.cache import cache_dir
from diffemb_jax.checkpoints.bundled import converted_smollm2
from diffemb_jax.errors import ConfigError
from diffemb_jax.evaluation import code_corpus
from diffemb_jax.evaluation.held_out import HeldOut, adaptation_table, adapted_model, eval_subset, fine_tune_and_score
from diffemb_jax.evaluation.retrieval import evaluate_embedder
from diffemb_jax.evaluation.stdlib_task import INSTRUCTION, write_jsonl
from diffemb_jax.training.config import base_config

LONG_INSTRUCTION = "Given a description of a Python module, retrieve its source"


@dataclasses.dataclass(frozen=True)
class Budget:
    packages: tuple[str, ...] | None  # None: every installed package
    max_per_package: int
    seeds: int
    adapt_steps: int
    adapt_batch: int
    adapt_length: int
    steps: int  # contrastive fine-tuning
    batch: int
    queries: int  # short-document test: judged queries, documents
    docs: int
    long_queries: int
    long_docs: int
    long_length: int  # tokens a long document is cut at
    query_length: int = 32
    doc_length: int = 128
    lr: float = 1e-3
    adapt_lr: float = 1e-4
    lora_rank: int = 8


BUDGETS = {
    # the test suite's: a few small packages, a step or two; on a tiny model it runs in seconds
    "tiny": Budget(packages=("json", "csv", "tqdm", "optax", "email", "argparse"), max_per_package=60, seeds=2,
                   adapt_steps=2, adapt_batch=4, adapt_length=32, steps=2, batch=4, queries=8, docs=16,
                   long_queries=4, long_docs=8, long_length=64, query_length=16, doc_length=32),
    # a 2-core CPU in about an hour (the demo's fine-tuning, twelve times, and two short adaptations)
    "small": Budget(packages=None, max_per_package=400, seeds=3, adapt_steps=40, adapt_batch=8, adapt_length=128,
                    steps=24, batch=8, queries=128, docs=256, long_queries=16, long_docs=32, long_length=512,
                    doc_length=64),
    # a GPU: longer adaptation and fine-tuning, the whole held-out sets
    "large": Budget(packages=None, max_per_package=2000, seeds=3, adapt_steps=2000, adapt_batch=32,
                    adapt_length=512, steps=500, batch=64, queries=2000, docs=20000, long_queries=500,
                    long_docs=2000, long_length=8192, lr=2e-4, adapt_lr=5e-5, lora_rank=16),
}
ROWS = (
    ("a", "causal", None, "causal, as pretrained"),
    ("b", "bidirectional", None, "bidirectional, no adaptation"),
    ("c", "bidirectional", "mntp", "bidirectional + MNTP"),
    ("d", "bidirectional", "diffusion", "bidirectional + masked diffusion"),
)


def default_budget() -> str:
    return "small" if jax.default_backend() == "cpu" else "large"


def hardware() -> str:
    """The host CPU (its model name where /proc/cpuinfo gives it) and cores, the devices, jax."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    devices = jax.devices()
    return (f"{cpu}, {os.cpu_count()} cores; {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}); "
            f"jax {jax.__version__}")


def _save_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_file(path, lambda f: json.dump(value, f, indent=2), text=True)


def _adaptation_text(path: Path, budget: Budget, test_packages) -> None:
    """A seeded sample of the train packages' functions (docstrings in), about four times the
    documents the adaptation's steps can read, so that a short budget does not tokenise them all."""
    everything = path.with_name("adapt-all.jsonl")
    code_corpus.write_text_corpus(everything, budget.packages, test_packages)
    lines = everything.read_text().splitlines()
    random.Random(0).shuffle(lines)
    atomic.write_file(path, lambda f: f.writelines(line + "\n" for line in
                                                   lines[: 4 * budget.adapt_steps * budget.adapt_batch]), text=True)
    everything.unlink()


def _fine_tune_config(model: Path, attention: str, budget: Budget, train_file: Path, data_cache: Path, seed: int):
    c = base_config()
    c.model.update(path=str(model), attention=attention, dtype="float32")
    c.lora.update(rank=budget.lora_rank, alpha=2.0 * budget.lora_rank, dropout=0.0)
    c.data.update(files=(str(train_file),), format="echo", query_max_length=budget.query_length,
                  doc_max_length=budget.doc_length, cache_dir=str(data_cache))
    c.train.update(seed=seed, steps=budget.steps, global_batch_size=budget.batch, lr=budget.lr,
                   warmup_steps=max(budget.steps // 10, 1), remat="none", checkpoint_every=budget.steps,
                   keep_checkpoints=1)
    return c


def minilm_scores(held_out: list[HeldOut]) -> dict[str, dict[str, float]] | None:
    """all-MiniLM-L6-v2 through sentence-transformers on the same sets (queries with the instruction
    as plain text, as it takes no prompt); None where either is missing."""
    try:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(assets.minilm_dir()), device="cpu")
    except (ImportError, FileNotFoundError):
        return None

    def encoder(prefix):
        return lambda texts: model.encode([prefix + t for t in texts], normalize_embeddings=True, batch_size=32)

    return {h.name: evaluate_embedder(encoder(f"{h.instruction}: "), encoder(""), h.test.queries, h.test.corpus,
                                      h.test.qrels) for h in held_out}


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{np.mean(values):.3f} ± {sd:.3f}"


def table(results: dict, held_out_names: list[str], minilm: dict | None) -> str:
    head = "| row | model | " + " | ".join(f"nDCG@10 {n}" for n in held_out_names) + " |"
    lines = [head, "|" + "---|" * (2 + len(held_out_names))]
    for key, _, _, label in ROWS:
        runs = results.get(key, [])
        cells = [_mean_sd([r["after"][n]["ndcg@10"] for r in runs]) for n in held_out_names]
        lines.append(f"| ({key}) | SmolLM2-135M, {label} | " + " | ".join(cells) + " |")
    if minilm:
        lines.append("| ref | all-MiniLM-L6-v2 (sentence-transformers, not fine-tuned here) | "
                     + " | ".join(f"{minilm[n]['ndcg@10']:.3f}" for n in held_out_names) + " |")
    return "\n".join(lines)


def run(budget_name: str | None = None, *, workdir: str | Path | None = None, model: str | Path | None = None,
        seeds: int | None = None, progress: bool = True) -> dict:
    """Run (or finish) the comparison; prints and returns {"table", "results", "adaptation", ...}."""
    budget_name = budget_name or default_budget()
    if budget_name not in BUDGETS:
        raise ConfigError(f"--budget must be one of {tuple(BUDGETS)}, got {budget_name!r}")
    budget = BUDGETS[budget_name]
    seeds = seeds or budget.seeds
    started = time.perf_counter()
    root = Path(workdir) if workdir else cache_dir() / "reproduce" / budget_name
    root.mkdir(parents=True, exist_ok=True)
    base = Path(model) if model else converted_smollm2()
    print(f"hardware: {hardware()}\nbudget: {budget_name} ({budget})\nworkdir: {root}\nbase model: {base}")

    corpus = code_corpus.build_code_corpus(budget.packages, max_per_package=budget.max_per_package)
    test_packages = corpus.test_packages
    long_test = code_corpus.long_documents_test(test_packages)
    held_out = [HeldOut("functions", eval_subset(corpus.test, budget.queries, budget.docs, 0), INSTRUCTION,
                        budget.doc_length),
                HeldOut("whole modules", eval_subset(long_test, budget.long_queries, budget.long_docs, 0),
                        LONG_INSTRUCTION, budget.long_length)]
    sizes = {"corpus": corpus.sizes, "functions": _set_size(held_out[0].test), "whole modules": _set_size(held_out[1].test)}
    print(f"task: docstring -> code, train packages: {len(corpus.train_packages)}, test packages: "
          f"{', '.join(test_packages)}; {json.dumps(sizes)}", flush=True)
    train_file, text, held_out_text = root / "train.jsonl", root / "adapt-train.jsonl", root / "adapt-held-out.jsonl"
    corpus.write_train_jsonl(train_file)
    if not text.exists():
        _adaptation_text(text, budget, test_packages)
    if not held_out_text.exists():  # the test packages' code: adaptation is scored on text it never saw
        held = sorted(corpus.test.corpus.values())
        random.Random(0).shuffle(held)
        write_jsonl(held_out_text, [{"text": t} for t in held[:256]])

    adapted, adaptation = {None: base}, {}
    for objective in ("mntp", "diffusion"):
        adapted[objective], adaptation[objective] = adapted_model(
            base, objective, root / f"adapt-{objective}", text, held_out_text, steps=budget.adapt_steps,
            batch=budget.adapt_batch, length=budget.adapt_length, lr=budget.adapt_lr, progress=progress)
    results: dict[str, list] = {}
    for seed in range(seeds):  # seed by seed: a run cut short still has every row at the same seeds
        for key, attention, objective, label in ROWS:
            done = root / "runs" / f"{key}-seed{seed}.json"
            if not done.exists():
                print(f"\n== ({key}) {label}, seed {seed}", flush=True)
                config = _fine_tune_config(adapted[objective], attention, budget, train_file, root / "data", seed)
                scored = fine_tune_and_score(config, root / "runs" / f"{key}-seed{seed}", held_out, before=False,
                                             progress=progress)
                _save_json(done, scored)
            results.setdefault(key, []).append(json.loads(done.read_text()))
    minilm_file = root / "minilm.json"
    if not minilm_file.exists():
        minilm = minilm_scores(held_out)
        if minilm is not None:
            _save_json(minilm_file, minilm)
    minilm = json.loads(minilm_file.read_text()) if minilm_file.exists() else None
    names = [h.name for h in held_out]
    report = {"table": table(results, names, minilm), "results": results, "adaptation": adaptation,
              "packages": {"train": list(corpus.train_packages), "test": list(test_packages)},
              "minilm": minilm, "sizes": sizes, "budget": dataclasses.asdict(budget), "seeds": seeds,
              "hardware": hardware(), "seconds": time.perf_counter() - started}
    _save_json(root / "results.json", report)
    print(f"\n{adaptation_table(adaptation)}\n\n{report['table']}\n")
    print(f"nDCG@10 on held-out packages ({', '.join(test_packages)}), mean ± sd over {seeds} seeds; "
          f"{report['seconds']:.0f} s on {report['hardware']}. Everything is in {root / 'results.json'}.")
    return report


def _set_size(s) -> dict[str, int]:
    return {"queries": len(s.queries), "documents": len(s.corpus)}
