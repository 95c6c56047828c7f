"""LongEmbed (Zhu et al., 2024): long-document retrieval, the paper's first benchmark.

Six tasks of the dataset repository dwzhu/LongEmbed, one config each, with splits corpus
(doc_id, text), queries (qid, text) and qrels (qid, doc_id): four real tasks scored by nDCG@10
over their whole corpus, and the synthetic Passkey and Needle, whose rows also carry a
context_length; those are scored by nDCG@1 within each length (256 ... 32768 tokens: each length
is its own corpus), and their task score is the mean over the lengths, as LongEmbed and MTEB
report them. Queries get the reference code's instruction for retrieval tasks without one of their
own (mteb's default prompt for the Retrieval type).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from diffemb_jax.errors import ConfigError
from diffemb_jax.evaluation import hub_data
from diffemb_jax.evaluation.benchmark import Embeds, checked_set, markdown_table, mean, retrieve
from diffemb_jax.evaluation.retrieval import RetrievalSet, evaluate_run

DEFAULT_SOURCE = "dwzhu/LongEmbed"
# Table order of the paper (and LongEmbed): task name -> config of the dataset repository.
TASKS = {"Passkey": "passkey", "Needle": "needle", "NarrativeQA": "narrativeqa", "QMSum": "qmsum",
         "2WikiMQA": "2wikimqa", "SummScreenFD": "summ_screen_fd"}
SYNTHETIC = ("Passkey", "Needle")
LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
INSTRUCTION = "Retrieve text based on user query"
TOP_K = 100
# The paper's Figure 1c (long-document retrieval, average of the six tasks); per-task numbers are
# not reproduced here.
PAPER = {"DiffEmbed (Dream-7B), paper": {"Avg": 0.62}, "LLM2Vec-adapted LLM, paper": {"Avg": 0.42}}


@dataclass
class LongEmbedResult:
    scores: dict[str, float]  # task -> nDCG@10 (real) or mean nDCG@1 over lengths (synthetic)
    by_length: dict[str, dict[int, float]] = field(default_factory=dict)  # synthetic task -> length -> nDCG@1
    sizes: dict[str, dict] = field(default_factory=dict)  # task -> queries and documents scored

    @property
    def average(self) -> float:
        return mean(list(self.scores.values()))


def load_task(root, task: str, lengths: Sequence[int] = LENGTHS) -> dict[int | None, RetrievalSet]:
    """The retrieval set(s) of one task: {None: set} for a real task, {length: set} for Passkey/Needle."""
    config = TASKS[task]
    where = f"LongEmbed {task} ({root}/{config})"
    tables = {split: hub_data.read_split(root, config, split) for split in ("corpus", "queries", "qrels")}
    if task not in SYNTHETIC:
        return {None: _retrieval_set(where, tables, None)}
    return {n: _retrieval_set(f"{where}, context length {n}", tables, n) for n in lengths}


def _retrieval_set(where: str, tables: dict[str, list[dict]], length: int | None) -> RetrievalSet:
    def rows(split):
        all_rows = tables[split]
        if length is None:
            return all_rows
        return [r for r in all_rows if int(hub_data.field(r, "context_length", f"{where}, {split}")) == length]

    corpus = {str(hub_data.field(r, "doc_id", f"{where}, corpus")): str(hub_data.field(r, "text", f"{where}, corpus"))
              for r in rows("corpus")}
    queries = {str(hub_data.field(r, "qid", f"{where}, queries")): str(hub_data.field(r, "text", f"{where}, queries"))
               for r in rows("queries")}
    qrels: dict[str, dict[str, int]] = {}
    for r in rows("qrels"):
        qid, docid = str(hub_data.field(r, "qid", f"{where}, qrels")), str(hub_data.field(r, "doc_id", f"{where}, qrels"))
        qrels.setdefault(qid, {})[docid] = 1
    return checked_set(where, queries, corpus, qrels)


def load_longembed(source=DEFAULT_SOURCE, tasks: Sequence[str] = tuple(TASKS),
                   lengths: Sequence[int] = LENGTHS) -> dict[str, dict[int | None, RetrievalSet]]:
    """Every task's retrieval set(s), read and checked (before any model is loaded)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown LongEmbed task(s) {unknown}; choose from {list(TASKS)}")
    bad = [n for n in lengths if n not in LENGTHS]
    if bad or not lengths:
        raise ConfigError(f"context lengths must be among {list(LENGTHS)}, got {list(lengths)}")
    root = hub_data.open_dataset(source)
    return {task: load_task(root, task, lengths) for task in tasks}


def score_longembed(embedder: Embeds, data: dict[str, dict[int | None, RetrievalSet]],
                    instruction: str | None = INSTRUCTION) -> LongEmbedResult:
    result = LongEmbedResult(scores={})
    for task, sets in data.items():
        if task in SYNTHETIC:
            per_length = {n: _score(embedder, s, instruction, "ndcg_cut_1") for n, s in sets.items()}
            result.by_length[task] = per_length
            result.scores[task] = mean(list(per_length.values()))
        else:
            result.scores[task] = _score(embedder, sets[None], instruction, "ndcg_cut_10")
        result.sizes[task] = {"queries": sum(len(s.qrels) for s in sets.values()),
                              "documents": sum(len(s.corpus) for s in sets.values())}
    return result


def _score(embedder: Embeds, data: RetrievalSet, instruction: str | None, measure: str) -> float:
    run = retrieve(embedder, data, instruction=instruction, top_k=TOP_K)
    return next(iter(evaluate_run(data.qrels, run, [measure]).values()))


def table(result: LongEmbedResult) -> str:
    """The paper's layout: one column a task and the average, ours and the paper's where known."""
    columns = [*result.scores, "Avg"]
    ours = [*result.scores.values(), result.average]
    rows = [("diffemb-jax (this run)", ours)]
    if set(result.scores) == set(TASKS):  # the paper's average is over all six
        rows += [(name, [ref.get(c) for c in columns]) for name, ref in PAPER.items()]
    text = markdown_table(columns, rows)
    for task, per_length in result.by_length.items():
        text += f"\n\n{task}, nDCG@1 by context length:\n"
        text += markdown_table([str(n) for n in per_length], [("diffemb-jax (this run)", list(per_length.values()))])
    return text
