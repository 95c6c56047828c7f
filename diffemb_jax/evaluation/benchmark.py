"""What the benchmark runners (LongEmbed, BRIGHT, FollowIR) share: checked retrieval sets, dense
retrieval with excluded documents, reranking of given candidates, and the paper-style table.

An embedder is anything with `encode(texts, instruction=None) -> [n, D]` L2-normalised float32
(diffemb_jax.embedding.Embedder). Queries get the instruction, documents none, as in the recipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from diffemb_jax.embedding.files import InputError
from diffemb_jax.evaluation.retrieval import (Qrels, RetrievalSet, Run, check_ids, encode_checked, run_from_search,
                                              search_corpus)


class Embeds(Protocol):
    def encode(self, texts: list[str], instruction: str | None = None) -> np.ndarray: ...


def checked_set(where: str, queries: dict[str, str], corpus: dict[str, str], qrels: Qrels) -> RetrievalSet:
    """A RetrievalSet whose judgments all point at existing queries and documents, or an InputError
    naming `where` (the benchmark, task and folder) and the first offending id."""
    check_ids(where, queries, corpus, qrels)
    if not qrels:
        raise InputError(f"{where}: there are no relevance judgments (qrels)")
    return RetrievalSet(queries=queries, corpus=corpus, qrels=qrels)


def retrieve(embedder: Embeds, data: RetrievalSet, *, instruction: str | None, top_k: int,
             excluded: dict[str, Sequence[str]] | None = None) -> Run:
    """Top-k documents of every judged query by cosine over the whole corpus, after dropping each
    query's excluded documents (BRIGHT's excluded_ids): as if they were not in the corpus."""
    qids, docids = list(data.qrels), list(data.corpus)
    excluded = excluded or {}
    depth = top_k + max((len(excluded.get(q, ())) for q in qids), default=0)
    scores, indices = search_corpus(lambda texts: embedder.encode(texts, instruction=instruction), embedder.encode,
                                    [data.queries[q] for q in qids], [data.corpus[d] for d in docids], depth)
    run = run_from_search(qids, docids, scores, indices)
    for qid, docs in run.items():
        drop = set(excluded.get(qid, ()))
        kept = [(d, s) for d, s in docs.items() if d not in drop]  # already best first
        run[qid] = dict(kept[:top_k])
    return run


def rerank(embedder: Embeds, queries: dict[str, str], corpus: dict[str, str], candidates: dict[str, list[str]],
           *, instruction: str | None) -> Run:
    """Each query's candidate documents scored by cosine (a reranking run): every document any query
    needs is embedded once."""
    needed = list(dict.fromkeys(d for qid in candidates for d in candidates[qid]))
    doc_row = {d: i for i, d in enumerate(needed)}
    qids = list(candidates)
    query_vectors = encode_checked(lambda texts: embedder.encode(texts, instruction=instruction),
                                   [queries[q] for q in qids], "the embedder")
    doc_vectors = encode_checked(embedder.encode, [corpus[d] for d in needed], "the embedder") if needed else None
    run: Run = {}
    for qid, vector in zip(qids, query_vectors):
        rows = [doc_row[d] for d in candidates[qid]]
        scores = doc_vectors[rows] @ vector if rows else []
        run[qid] = {d: float(s) for d, s in zip(candidates[qid], scores)}
    return run


def markdown_table(columns: Sequence[str], rows: Sequence[tuple[str, Sequence[float | None]]],
                   percent: bool = True) -> str:
    """| name | col... | rows; numbers x100 with one decimal (the papers' layout), None as '–'."""
    def cell(v):
        if v is None:
            return "–"
        return f"{100 * v:.1f}" if percent else f"{v:.1f}"

    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += ["| " + name + " | " + " | ".join(cell(v) for v in values) + " |" for name, values in rows]
    return "\n".join(lines)


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")
