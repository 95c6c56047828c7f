"""Dense search against brute force, and the metrics against independent implementations."""

import math

import numpy as np
import pytest

from diffemb_jax.evaluation.retrieval import evaluate_embedder, evaluate_run, run_from_search, search, search_corpus


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("top_k,batch", [(10, 8), (10, 1000), (7, 50), (200, 16)])
def test_search_equals_brute_force(top_k, batch):
    """Oracle: a full numpy argsort of all scores; indices exact, scores to 1e-6."""
    rng = np.random.default_rng(0)
    queries, docs = _unit(rng, 7, 16), _unit(rng, 50, 16)
    scores, indices = search(queries, docs, top_k=top_k, batch=batch)
    full = queries @ docs.T
    expected = np.argsort(-full, axis=1)[:, :min(top_k, len(docs))]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, axis=1), atol=1e-6)


def test_search_corpus_embeds_the_corpus_chunk_by_chunk():
    """Oracle: a full numpy argsort; the encoder never sees more than `chunk` documents at once."""
    rng = np.random.default_rng(2)
    vectors = {f"doc {i}": v for i, v in enumerate(_unit(rng, 45, 8))}
    queries = {f"query {i}": v for i, v in enumerate(_unit(rng, 6, 8))}
    calls = []

    def encode_docs(texts):
        calls.append(len(texts))
        return np.stack([vectors[t] for t in texts])

    scores, indices = search_corpus(lambda texts: np.stack([queries[t] for t in texts]), encode_docs,
                                    list(queries), list(vectors), top_k=10, chunk=7)
    full = np.stack(list(queries.values())) @ np.stack(list(vectors.values())).T
    np.testing.assert_array_equal(indices, np.argsort(-full, axis=1)[:, :10])
    np.testing.assert_allclose(scores, np.sort(full, axis=1)[:, ::-1][:, :10], atol=1e-6)
    assert calls == [7, 7, 7, 7, 7, 7, 3]


def test_search_breaks_ties_by_lower_index_across_shards():
    docs = np.tile(np.eye(4, dtype=np.float32)[:1], (10, 1))
    _, indices = search(np.eye(4, dtype=np.float32)[:1], docs, top_k=5, batch=3)
    np.testing.assert_array_equal(indices, [[0, 1, 2, 3, 4]])


def test_run_from_search_names_rows_and_columns():
    run = run_from_search(["a", "b"], ["x", "y", "z"], np.array([[0.9, 0.1], [0.8, 0.7]]), np.array([[2, 0], [1, 2]]))
    assert run == {"a": {"z": 0.9, "x": pytest.approx(0.1)}, "b": {"y": pytest.approx(0.8), "z": pytest.approx(0.7)}}


def _random_qrels_and_run(seed=0, n_queries=20, n_docs=150, depth=120):
    rng = np.random.default_rng(seed)
    docids = [f"d{i}" for i in range(n_docs)]
    qrels, run = {}, {}
    for q in range(n_queries):
        judged = rng.choice(n_docs, size=8, replace=False)
        qrels[f"q{q}"] = {docids[j]: int(rng.integers(0, 3)) for j in judged}
        qrels[f"q{q}"][docids[judged[0]]] = 2  # at least one relevant document
        retrieved = rng.choice(n_docs, size=depth, replace=False)
        run[f"q{q}"] = {docids[j]: float(s) for j, s in zip(retrieved, rng.random(depth))}
    del run["q0"]  # judged, not retrieved: counts 0
    run["unjudged"] = {"d0": 1.0}  # retrieved, not judged: ignored
    return qrels, run


def _ranking(docs):
    return [d for d, _ in sorted(docs.items(), key=lambda item: -item[1])]


def _textbook(qrels, run):
    """Second implementation: nDCG@10 (gain = grade, log2 discount), AP@100, recall@100, MRR@10."""
    sums = dict.fromkeys(("ndcg@10", "map@100", "recall@100", "mrr@10"), 0.0)
    for qid, judged in qrels.items():
        ranking = _ranking(run.get(qid, {}))
        relevant = {d for d, g in judged.items() if g > 0}
        dcg = sum(judged.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranking[:10]))
        ideal = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(judged.values(), reverse=True)[:10]))
        hits = [i for i, d in enumerate(ranking[:100]) if d in relevant]
        sums["ndcg@10"] += dcg / ideal
        sums["map@100"] += sum((n + 1) / (i + 1) for n, i in enumerate(hits)) / len(relevant)
        sums["recall@100"] += len(hits) / len(relevant)
        sums["mrr@10"] += next((1 / (i + 1) for i in hits if i < 10), 0.0)
    return {k: v / len(qrels) for k, v in sums.items()}


def test_metrics_equal_a_textbook_implementation():
    qrels, run = _random_qrels_and_run()
    got = evaluate_run(qrels, run)
    assert set(got) == {"ndcg@10", "map@100", "recall@100", "mrr@10"}
    for name, value in _textbook(qrels, run).items():
        assert got[name] == pytest.approx(value, abs=1e-9), name


def test_mrr_at_10_equals_ir_measures_msmarco():
    """Oracle: ir_measures' own MS MARCO RR@10 (not its pytrec_eval provider), averaged over judged queries."""
    ir_measures = pytest.importorskip("ir_measures")
    qrels, run = _random_qrels_and_run(seed=1)
    rr10 = ir_measures.RR @ 10
    per_query = {m.query_id: m.value for m in ir_measures.msmarco.iter_calc([rr10], qrels, run)}
    expected = sum(per_query.get(q, 0.0) for q in qrels) / len(qrels)
    assert evaluate_run(qrels, run)["mrr@10"] == pytest.approx(expected, abs=1e-9)
    assert expected != pytest.approx(_uncut_rr(qrels, run))  # some first hit lies below rank 10


def test_metrics_equal_ir_measures_trectools():
    """Oracle: ir_measures over trectools (a second implementation, not trec_eval): nDCG@10, AP@100
    and RR@10 per query, averaged over judged queries. trectools gives NaN where no relevant document
    is retrieved within the cut (its 0/0); trec_eval and we count those queries 0."""
    ir_measures = pytest.importorskip("ir_measures")
    trectools = ir_measures.providers.registry["trectools"]
    if not trectools.is_available():
        pytest.fail("ir_measures' trectools provider is unavailable: install trectools (a test dependency)")
    qrels, run = _random_qrels_and_run(seed=3)
    run = {q: docs for q, docs in run.items() if q in qrels}
    ours = evaluate_run(qrels, run)
    for name, measure in (("ndcg@10", ir_measures.nDCG @ 10), ("map@100", ir_measures.AP @ 100),
                          ("mrr@10", ir_measures.RR @ 10)):
        per_query = {m.query_id: m.value for m in trectools.iter_calc([measure], qrels, run)}
        expected = sum(0.0 if math.isnan(v) else v for v in per_query.values()) / len(qrels)
        assert ours[name] == pytest.approx(expected, abs=1e-9), name
        assert expected > 0, name


def _uncut_rr(qrels, run):
    total = 0.0
    for qid, judged in qrels.items():
        ranking = _ranking(run.get(qid, {}))
        total += next((1 / (i + 1) for i, d in enumerate(ranking) if judged.get(d, 0) > 0), 0.0)
    return total / len(qrels)


def test_evaluate_embedder_perfect_encoder_scores_one():
    corpus = {f"d{i}": f"doc {i}" for i in range(30)}
    queries = {f"q{i}": f"query {i}" for i in range(30)}
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(30)}
    one_hot = lambda texts: np.eye(32, dtype=np.float32)[[int(t.split()[1]) for t in texts]]  # noqa: E731
    scores = evaluate_embedder(one_hot, one_hot, queries, corpus, qrels, top_k=10)
    assert scores == {"ndcg@10": 1.0, "map@100": 1.0, "recall@100": 1.0, "mrr@10": 1.0}


@pytest.mark.parametrize("queries,corpus,qrels,match", [
    ({"q1": "x"}, {"d1": "y"}, {"q2": {"d1": 1}}, "'q2'"),
    ({"q1": "x"}, {}, {"q1": {"d1": 1}}, "corpus is empty"),
    ({"q1": "x"}, {"d1": "y"}, {"q1": {"d9": 1}}, "'d9'"),
])
def test_evaluate_embedder_rejects_inconsistent_judgments(queries, corpus, qrels, match):
    encode = lambda texts: np.ones((len(texts), 4), np.float32)  # noqa: E731
    with pytest.raises(ValueError, match=match):
        evaluate_embedder(encode, encode, queries, corpus, qrels)


def test_search_rejects_an_empty_corpus_and_mismatched_widths():
    with pytest.raises(ValueError, match="empty"):
        search(np.ones((2, 4)), np.ones((0, 4)))
    with pytest.raises(ValueError, match="D"):
        search(np.ones((2, 4)), np.ones((3, 5)))
