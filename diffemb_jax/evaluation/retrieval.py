"""Dense retrieval and its metrics: exact top-k search over doc shards, TREC runs, pytrec_eval scores.

search scores a corpus in shards of `batch` documents and keeps a running top-k, so memory is
O(Q * (k + batch)) whatever the corpus size; search_corpus also embeds the corpus shard by shard, so
its embeddings never need to fit in memory together. Ties are broken by the lower document index.
Metrics come from pytrec_eval (trec_eval), averaged over every judged query: a query with
judgments but no retrieved documents counts 0 (trec_eval -c), a run query without judgments is
ignored. trec_eval orders a query's documents by score, then by doc id descending, whatever order
the run lists them in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pytrec_eval

from diffemb_jax.embedding.dimensions import truncate
from diffemb_jax.embedding.files import InputError

DEFAULT_MEASURES = ("ndcg_cut_10", "map_cut_100", "recall_100", "recip_rank")
MRR_CUTOFF = 10
CORPUS_CHUNK = 16384  # documents embedded at a time while searching

Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]
Encoder = Callable[[list[str]], np.ndarray]  # texts -> L2-normalised [n, D]


@dataclass(frozen=True)
class RetrievalSet:
    """queries {qid: text}, corpus {docid: text}, qrels {qid: {docid: relevance}}."""

    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: Qrels


class TopK:
    """Exact running top-k of query x document dot products over document shards added in order
    (document indices continue across shards): memory O(Q * (k + shard))."""

    def __init__(self, query_vectors: np.ndarray, top_k: int):
        self.queries = np.asarray(query_vectors, dtype=np.float32)
        if self.queries.ndim != 2:
            raise ValueError(f"need [Q, D] queries, got {self.queries.shape}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k, self.seen = top_k, 0
        self.scores = np.empty((len(self.queries), 0), np.float32)
        self.indices = np.empty((len(self.queries), 0), np.int64)

    def add(self, doc_vectors: np.ndarray) -> None:
        shard = np.asarray(doc_vectors, dtype=np.float32)
        if shard.ndim != 2 or shard.shape[1] != self.queries.shape[1]:
            raise ValueError(f"need [n, {self.queries.shape[1]}] documents, got {shard.shape}")
        scores = np.concatenate([self.scores, self.queries @ shard.T], axis=1)
        shard_indices = np.broadcast_to(np.arange(self.seen, self.seen + len(shard)), (len(self.queries), len(shard)))
        indices = np.concatenate([self.indices, shard_indices], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :self.top_k]  # stable: ties keep the lower index
        self.scores = np.take_along_axis(scores, order, axis=1)
        self.indices = np.take_along_axis(indices, order, axis=1)
        self.seen += len(shard)


def search(query_vectors: np.ndarray, doc_vectors: np.ndarray, top_k: int = 100,
           batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by dot product (cosine for L2-normalised vectors): scores, indices [Q, min(k, N)]."""
    queries = np.asarray(query_vectors, dtype=np.float32)
    docs = np.asarray(doc_vectors, dtype=np.float32)
    _check_search_args(queries, docs, top_k, batch)
    best = TopK(queries, top_k)
    for start in range(0, len(docs), batch):
        best.add(docs[start:start + batch])
    return best.scores, best.indices


def search_corpus(encode_queries: Encoder, encode_docs: Encoder, query_texts: list[str], doc_texts: list[str],
                  top_k: int, chunk: int = CORPUS_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Encode the queries, then the corpus `chunk` documents at a time, each chunk folded into a
    running top-k: the corpus's embeddings are never all in memory at once."""
    best = search_corpus_by_dimension(encode_queries, encode_docs, query_texts, doc_texts, top_k, (None,), chunk)
    return best[None]


def search_corpus_by_dimension(encode_queries: Encoder, encode_docs: Encoder, query_texts: list[str],
                               doc_texts: list[str], top_k: int, dimensions: Sequence[int | None],
                               chunk: int = CORPUS_CHUNK) -> dict[int | None, tuple[np.ndarray, np.ndarray]]:
    """search_corpus for each of `dimensions` at once: queries and each corpus chunk are encoded once, at
    full size, then cut to each N's first components and re-normalised (None: the vectors as they are).
    -> {N: (scores, indices)}."""
    if not doc_texts:
        raise ValueError("the corpus is empty")

    def cut(vectors, n):
        return vectors if n is None else truncate(vectors, n)

    queries = encode_checked(encode_queries, query_texts, "encode_queries")
    best = {n: TopK(cut(queries, n), top_k) for n in dimensions}
    for start in range(0, len(doc_texts), chunk):
        docs = encode_checked(encode_docs, doc_texts[start:start + chunk], "encode_docs")
        for n, top in best.items():
            top.add(cut(docs, n))
    return {n: (top.scores, top.indices) for n, top in best.items()}


def _check_search_args(queries: np.ndarray, docs: np.ndarray, top_k: int, batch: int) -> None:
    if queries.ndim != 2 or docs.ndim != 2 or queries.shape[1] != docs.shape[1]:
        raise ValueError(f"need [Q, D] queries and [N, D] docs, got {queries.shape} and {docs.shape}")
    if len(docs) == 0:
        raise ValueError("the corpus is empty")
    if top_k < 1 or batch < 1:
        raise ValueError(f"top_k and batch must be >= 1, got {top_k} and {batch}")


def run_from_search(qids: Sequence[str], docids: Sequence[str], scores: np.ndarray, indices: np.ndarray) -> Run:
    """A TREC run {qid: {docid: score}} from search's output; row i belongs to qids[i]."""
    return {qid: {docids[j]: float(s) for s, j in zip(row_scores, row_indices)}
            for qid, row_scores, row_indices in zip(qids, scores, indices, strict=True)}


def evaluate_run(qrels: Qrels, run: Run, measures: Sequence[str] = DEFAULT_MEASURES) -> dict[str, float]:
    """Mean of each trec_eval measure over the judged queries, keyed "ndcg@10", "map@100", ...

    "recip_rank" is scored on the run cut to its top MRR_CUTOFF documents and keyed "mrr@10".
    """
    if not qrels:
        raise ValueError("qrels is empty: no query to average over")
    results = {}
    plain = [m for m in measures if m != "recip_rank"]
    if plain:
        results.update(_mean_over_judged(qrels, run, plain))
    if "recip_rank" in measures:
        cut = {qid: _top(docs, MRR_CUTOFF) for qid, docs in run.items()}
        results.update(_mean_over_judged(qrels, cut, ["recip_rank"]))
    return {_public_name(m): results[m] for m in measures}


def _mean_over_judged(qrels: Qrels, run: Run, measures: Sequence[str]) -> dict[str, float]:
    per_query = pytrec_eval.RelevanceEvaluator(qrels, set(measures)).evaluate(run)
    return {m: sum(per_query[q][m] for q in per_query) / len(qrels) for m in measures}


def _top(docs: dict[str, float], k: int) -> dict[str, float]:
    """The k documents trec_eval ranks first: score descending, then doc id descending."""
    return dict(sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)[:k])


def _public_name(measure: str) -> str:
    if measure == "recip_rank":
        return f"mrr@{MRR_CUTOFF}"
    return re.sub(r"(?:_cut)?_(\d+)$", r"@\1", measure)


def evaluate_embedder(encode_queries: Encoder, encode_docs: Encoder, queries: dict[str, str], corpus: dict[str, str],
                      qrels: Qrels, top_k: int = 100) -> dict[str, float]:
    """Encode the judged queries and the corpus, search, score; encoders return L2-normalised [n, D]."""
    check_ids("qrels", queries, corpus, qrels)
    qids, docids = list(qrels), list(corpus)
    scores, indices = search_corpus(encode_queries, encode_docs, [queries[q] for q in qids],
                                    [corpus[d] for d in docids], top_k)
    return evaluate_run(qrels, run_from_search(qids, docids, scores, indices))


def evaluate_embedder_by_dimension(encode_queries: Encoder, encode_docs: Encoder, queries: dict[str, str],
                                   corpus: dict[str, str], qrels: Qrels, dimensions: Sequence[int],
                                   top_k: int = 100) -> dict[int, dict[str, float]]:
    """evaluate_embedder with the embeddings cut to each N of `dimensions` (first N components,
    re-normalised), from one encode at full size: {N: metrics}."""
    check_ids("qrels", queries, corpus, qrels)
    qids, docids = list(qrels), list(corpus)
    found = search_corpus_by_dimension(encode_queries, encode_docs, [queries[q] for q in qids],
                                       [corpus[d] for d in docids], top_k, dimensions)
    return {n: evaluate_run(qrels, run_from_search(qids, docids, *found[n])) for n in dimensions}


def check_ids(where: str, queries: dict[str, str], corpus: dict[str, str], documents_of: dict, *,
              what: str = "judged") -> None:
    """Every query id of `documents_of` among the queries and every document id it lists in a
    non-empty corpus, or an InputError naming `where` and the first offending id. `what` names the
    lists: "judged" (qrels) or, say, "top_ranked" (a reranking's candidates)."""
    if not corpus:
        raise InputError(f"{where}: the corpus is empty; it needs at least one document")
    for qid, docids in documents_of.items():
        if qid not in queries:
            raise InputError(f"{where}: {what} query id {qid!r} is not among the {len(queries)} queries")
        missing = next((d for d in docids if d not in corpus), None)
        if missing is not None:
            raise InputError(f"{where}: document {missing!r} {what} for query {qid!r} is not in the corpus")


def encode_checked(encode: Encoder, texts: list[str], name: str) -> np.ndarray:
    """encode(texts), refused unless it is one vector a text."""
    vectors = np.asarray(encode(texts))
    if vectors.ndim != 2 or len(vectors) != len(texts):
        raise ValueError(f"{name} returned shape {vectors.shape} for {len(texts)} texts; expected [n, D]")
    return vectors
