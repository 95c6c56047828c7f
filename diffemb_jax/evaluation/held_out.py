"""One experiment, the demo's and `diffemb reproduce`'s: fine-tune a LoRA embedder, then score it on
held-out retrieval sets.

The model is scored through `merge_lora`: the merged model embeds without the adapters' extra
products, in the attention mode (and kernel) it was trained with. Before training B = 0 and the
merged model is the base model itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import random
import time
from pathlib import Path

from flax import nnx

from diffemb_jax.embedding import Embedder
from diffemb_jax.evaluation.retrieval import RetrievalSet, evaluate_embedder
from diffemb_jax.model import ForwardOptions
from diffemb_jax.model.lora import merge_lora
from diffemb_jax.training.adapt import MODEL_DIR, Adaptation
from diffemb_jax.training.config import adapt_config
from diffemb_jax.training.trainer import Trainer, lora_config


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """A retrieval set to score, with the instruction its queries get and its documents' token cap."""

    name: str
    test: RetrievalSet
    instruction: str
    doc_max_length: int


def eval_subset(test: RetrievalSet, n_queries: int, n_docs: int, seed: int) -> RetrievalSet:
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


@contextlib.contextmanager
def _quiet_truncation():
    """Documents are cut at their max length on purpose: no warning for every batch of them."""
    log = logging.getLogger("diffemb_jax.embedding.embedder")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def score(model, tokenizer, held_out: HeldOut, options: ForwardOptions, *, query_max_length: int,
          batch_size: int = 16, label: str = "", progress: bool = False) -> dict[str, float]:
    """nDCG@10 etc. of a plain (merged) Decoder run with `options` on one held-out set."""
    def embedder(max_length: int) -> Embedder:
        return Embedder(model, tokenizer, max_length=max_length, batch_size=batch_size, options=options)

    queries, docs = embedder(query_max_length), embedder(held_out.doc_max_length)
    if progress:
        print(f"  encoding {label}{held_out.name}", flush=True)

    def encode_queries(texts):
        return queries.encode(texts, instruction=held_out.instruction, progress=progress)

    def encode_docs(texts):
        return docs.encode(texts, progress=progress)

    t = held_out.test
    with _quiet_truncation():
        return evaluate_embedder(encode_queries, encode_docs, t.queries, t.corpus, t.qrels)


def fine_tune_and_score(config, workdir: Path, held_out: list[HeldOut], *, batch_size: int = 16,
                        before: bool = True, progress: bool = False) -> dict:
    """Train the config's LoRA embedder in `workdir` and score it on each held-out set, before
    (unless `before` is False) and after: {"before": {name: metrics}, "after": {...}, "steps",
    "train_seconds", "first_loss", "last_loss"}."""
    options = ForwardOptions(attention=config.model.attention, kernel=config.model.kernel)  # as trained, no remat
    # tfds announces "Downloading and preparing" and draws bars while it stores the local JSONL: hide that
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer = Trainer(config, workdir)
    lora = lora_config(config)

    def scores(when: str) -> dict:
        merged = merge_lora(trainer.model, lora)
        return {h.name: score(merged, trainer.tokenizer, h, options, query_max_length=config.data.query_max_length,
                              batch_size=batch_size, label=f"{config.model.attention}, {when}: ", progress=progress)
                for h in held_out}

    result = {"before": scores("before") if before else {}}
    start = time.perf_counter()
    history = trainer.run(progress=progress)
    seconds = time.perf_counter() - start
    nnx.update(trainer.model, trainer.lora)  # the trained adapters; the train step donated the old ones
    return {**result, "after": scores("after"), "steps": len(history), "train_seconds": seconds,
            "first_loss": history[0]["loss"] if history else float("nan"),
            "last_loss": history[-1]["loss"] if history else float("nan")}


def adapted_model(base: Path, objective: str, folder: Path, text: Path, held_out_text: Path, *, steps: int,
                  batch: int, length: int, lr: float, progress: bool = False) -> tuple[Path, dict]:
    """The model `diffemb adapt` makes from `base` in `folder` (made unless it is there already, so
    a rerun reuses it), and its held-out scores: {"eval_before", "eval_after", "first_loss",
    "last_loss"}. mntp is llm2vec's (LoRA r=16 on every projection), diffusion is full-parameter."""
    if not (folder / MODEL_DIR).exists():
        c = adapt_config()
        c.model.path = str(base)
        c.objective.kind = objective
        if objective == "mntp":
            c.lora.update(rank=16, alpha=32.0, dropout=0.05)
        c.data.update(files=(str(text),), eval_files=(str(held_out_text),), length=length)
        c.train.update(steps=steps, global_batch_size=batch, lr=lr, warmup_steps=max(steps // 10, 1), remat="none",
                       checkpoint_every=max(steps // 4, 1), keep_checkpoints=1)
        print(f"\n== adapting ({objective}): {steps} steps x {batch} rows of {length} tokens", flush=True)
        Adaptation(c, folder, progress=progress).run()
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in records if "eval_accuracy" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    return folder / MODEL_DIR, {"eval_before": evals[0] if evals else {}, "eval_after": evals[-1] if evals else {},
                                "first_loss": losses[0] if losses else float("nan"),
                                "last_loss": losses[-1] if losses else float("nan")}


def adaptation_table(adaptation: dict) -> str:
    lines = ["| adaptation | loss first -> last | held-out masked-token accuracy before -> after |", "|---|---|---|"]
    for objective, a in adaptation.items():
        before, after = a["eval_before"].get("eval_accuracy", float("nan")), a["eval_after"].get("eval_accuracy",
                                                                                                 float("nan"))
        lines.append(f"| {objective} | {a['first_loss']:.3f} -> {a['last_loss']:.3f} | {before:.3f} -> {after:.3f} |")
    return "\n".join(lines)
