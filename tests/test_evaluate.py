"""Evaluation front ends: the BEIR folder loader and its refusals, `diffemb evaluate retrieval|similarity`
end to end on a tiny converted model, similarity correlations against scipy on independently computed
cosines, and the MTEB encoder on an offline custom retrieval task against our own evaluate_embedder."""

import json

import numpy as np
import pytest
from scipy import stats

import tiny
from diffemb_jax.checkpoints import convert
from diffemb_jax.cli import main as cli
from diffemb_jax.embedding import Embedder
from diffemb_jax.embedding.files import InputError
from diffemb_jax.evaluation.beir import load_beir
from diffemb_jax.evaluation.retrieval import evaluate_embedder
from diffemb_jax.evaluation.similarity import correlations, evaluate_similarity, read_pairs

CORPUS = [
    {"_id": "d1", "title": "music", "text": "the man plays the guitar"},
    {"_id": "d2", "title": "", "text": "a dog runs in the house"},
    {"_id": "d3", "title": None, "text": "the market fell and stock rose"},
    {"_id": "d4", "title": "bread", "text": "she bakes bread for the child"},
    {"_id": 5, "text": "the big red car is fast"},
    {"_id": "d6", "title": "tree", "text": "a small green tree"},
    {"_id": "d7", "title": "text", "text": "he reads and writes a text"},
    {"_id": "d8", "title": "model", "text": "diffusion model for embedding and retrieval"},
    {"_id": "d9", "title": "cat", "text": "the cat is happy on the car"},
    {"_id": "d10", "text": "one two three four five"},
]
QUERIES = [
    {"_id": "q1", "text": "who plays music"},
    {"_id": "q2", "text": "the dog runs"},
    {"_id": "q3", "text": "stock market"},
    {"_id": "q4", "text": "a fast car"},
    {"_id": "q5", "text": "embedding model for retrieval"},
    {"_id": "q6", "text": "sad cat"},  # not judged: loaded, never scored
]
QRELS = [("q1", "d1", 2), ("q1", "d7", 0), ("q2", "d2", 1), ("q3", "d3", 1), ("q3", "d4", 0),
         ("q4", "5", 2), ("q4", "d9", 1), ("q5", "d8", 1)]
INSTRUCTION = "retrieval of the document for the query"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    return convert(tiny.write_checkpoint("qwen2", root / "hf"), root / "converted", progress=False)


@pytest.fixture(scope="module")
def embedder(model_dir):
    return Embedder.from_pretrained(model_dir, batch_size=4, max_length=64)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_beir(folder, corpus=CORPUS, queries=QUERIES, qrels=QRELS, split="test", header=True):
    (folder / "qrels").mkdir(parents=True)
    _jsonl(folder / "corpus.jsonl", corpus)
    _jsonl(folder / "queries.jsonl", queries)
    lines = (["query-id\tcorpus-id\tscore"] if header else []) + [f"{q}\t{d}\t{s}" for q, d, s in qrels]
    (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


# --- BEIR loader ---------------------------------------------------------------------------------

def test_load_beir_reads_the_folder(tmp_path):
    data = load_beir(write_beir(tmp_path / "beir"))
    assert data.corpus["d1"] == "music the man plays the guitar"  # title + " " + text
    assert data.corpus["d2"] == "a dog runs in the house"  # empty title
    assert data.corpus["d3"] == "the market fell and stock rose"  # null title
    assert data.corpus["5"] == "the big red car is fast"  # integer id, no title field
    assert len(data.corpus) == 10 and list(data.corpus)[:2] == ["d1", "d2"]
    assert data.queries["q6"] == "sad cat" and len(data.queries) == 6
    assert data.qrels == {"q1": {"d1": 2, "d7": 0}, "q2": {"d2": 1}, "q3": {"d3": 1, "d4": 0},
                          "q4": {"5": 2, "d9": 1}, "q5": {"d8": 1}}


def test_load_beir_without_header_and_other_split(tmp_path):
    data = load_beir(write_beir(tmp_path / "beir", split="dev", header=False), split="dev")
    assert data.qrels["q4"] == {"5": 2, "d9": 1}


def _refused(tmp_path, *needles, split="test", **beir):
    folder = write_beir(tmp_path / "beir", **beir)
    with pytest.raises(InputError) as e:
        load_beir(folder, split)
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    return folder


def test_missing_qrels_file_names_it_and_the_splits_there(tmp_path):
    _refused(tmp_path, "qrels/validation.tsv", "no such file", "splits found: test", split="validation")


def test_qrels_query_missing_from_queries_names_file_and_line(tmp_path):
    _refused(tmp_path, "test.tsv:3", "query id 'q9'", "queries.jsonl",
             qrels=[("q1", "d1", 1), ("q9", "d2", 1)])


def test_qrels_document_missing_from_corpus(tmp_path):
    _refused(tmp_path, "test.tsv:2", "corpus id 'd99'", qrels=[("q1", "d99", 1)])


def test_empty_corpus(tmp_path):
    _refused(tmp_path, "corpus.jsonl", "the corpus is empty", corpus=[])


@pytest.mark.parametrize("line,needles", [
    ("q1\td1", ["test.tsv:3", "expected 3 tab-separated fields"]),
    ("q1\td1\thigh", ["test.tsv:3", "not an integer"]),
])
def test_malformed_qrels_line(tmp_path, line, needles):
    folder = write_beir(tmp_path / "beir")
    path = folder / "qrels" / "test.tsv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + [line] + lines[2:]) + "\n")
    with pytest.raises(InputError) as e:
        load_beir(folder)
    for needle in needles:
        assert needle in str(e.value), str(e.value)


def test_malformed_corpus_and_queries_lines(tmp_path):
    folder = write_beir(tmp_path / "beir")
    (folder / "corpus.jsonl").write_text('{"_id": "d1", "text": "a"}\n{"_id": "d2", "text": \n')
    with pytest.raises(InputError, match=r"corpus.jsonl:2: not valid JSON"):
        load_beir(folder)
    _jsonl(folder / "corpus.jsonl", CORPUS)
    _jsonl(folder / "queries.jsonl", [{"_id": "q1", "text": "a"}, {"id": "q2", "text": "b"}])
    with pytest.raises(InputError, match=r"queries.jsonl:2: .*\"_id\""):
        load_beir(folder)
    _jsonl(folder / "queries.jsonl", QUERIES + [QUERIES[0]])
    with pytest.raises(InputError, match=r"queries.jsonl:7: query id 'q1' appears twice"):
        load_beir(folder)


# --- diffemb evaluate retrieval --------------------------------------------------------------------

def _retrieval(model_dir, data, output, *extra):
    return cli(["evaluate", "retrieval", "--model", str(model_dir), "--data", str(data), "--output", str(output),
                "--batch-size", "4", "--max-length", "64", *extra])


def test_cli_retrieval_writes_the_four_metrics(model_dir, embedder, tmp_path, capsys):
    folder, out = write_beir(tmp_path / "beir"), tmp_path / "results.json"
    assert _retrieval(model_dir, folder, out, "--query-instruction", INSTRUCTION) == 0
    record = json.loads(out.read_text())
    metrics = record["metrics"]
    assert set(metrics) == {"ndcg@10", "map@100", "recall@100", "mrr@10"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values()), metrics
    assert record["queries"] == 5 and record["documents"] == 10 and record["query_instruction"] == INSTRUCTION
    assert metrics["recall@100"] == 1.0  # 10 documents, all retrieved
    data = load_beir(folder)
    want = evaluate_embedder(lambda t: embedder.encode(t, instruction=INSTRUCTION, progress=False),
                             lambda t: embedder.encode(t, progress=False), data.queries, data.corpus, data.qrels)
    for k, v in want.items():
        assert metrics[k] == pytest.approx(v, abs=1e-6)
    printed = capsys.readouterr().out
    assert "| nDCG@10 | MAP@100 | Recall@100 | MRR@10 |" in printed
    assert f"| {metrics['ndcg@10']:.4f} |" in printed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_retrieval_dimensions_gives_a_row_per_dimension(model_dir, embedder, tmp_path, capsys):
    """Oracle: evaluate_embedder on encoders whose full-size vectors the test cuts and re-normalises
    with numpy, one dimension at a time."""
    folder, out = write_beir(tmp_path / "beir"), tmp_path / "results.json"
    assert _retrieval(model_dir, folder, out, "--dimensions", "4,16,32") == 0
    record = json.loads(out.read_text())
    assert record["dimensions"] == [4, 16, 32] and set(record["metrics"]) == {"4", "16", "32"}
    printed = capsys.readouterr().out
    assert "| N | nDCG@10 | MAP@100 | Recall@100 | MRR@10 |" in printed
    data = load_beir(folder)

    def cut(n):
        def encode(texts):
            full = embedder.encode(texts, progress=False)[:, :n]
            return full / np.linalg.norm(full, axis=-1, keepdims=True)
        return encode

    for n in (4, 16, 32):
        want = evaluate_embedder(cut(n), cut(n), data.queries, data.corpus, data.qrels)
        got = record["metrics"][str(n)]
        for k, v in want.items():
            assert got[k] == pytest.approx(v, abs=1e-6), (n, k)
        assert f"| {n} | {got['ndcg@10']:.4f} | {got['map@100']:.4f} |" in printed
    assert _retrieval(model_dir, folder, tmp_path / "bad.json", "--dimensions", "8,64") == 2
    assert "--dimensions 64: the model's embeddings have 32 components" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _retrieval(model_dir, folder, tmp_path / "bad.json", "--dimensions", "8,x")
    assert "give positive integers separated by commas" in capsys.readouterr().err


def test_cli_retrieval_bad_folder_exits_2_before_loading_the_model(tmp_path, capsys):
    folder, out = write_beir(tmp_path / "beir"), tmp_path / "results.json"
    # the model path does not exist: the data error must come first
    assert _retrieval(tmp_path / "no-model", folder, out, "--split", "dev") == 2
    err = capsys.readouterr().err
    assert "diffemb evaluate: error:" in err and "dev.tsv: no such file" in err
    assert not out.exists()


# --- similarity ------------------------------------------------------------------------------------

PAIRS = [("the cat plays music", "a cat sings", 3.8), ("the dog runs fast", "a big red car", 0.4),
         ("she reads a text", "she writes a text", 3.0), ("the stock market fell", "the stock market rose", 2.5),
         ("one two three", "four five six", 1.2), ("the tree is green", "a green tree", 4.6),
         ("the man bakes bread", "the child is happy", 0.9)]


def _write_pairs(path):
    if path.suffix == ".tsv":  # STS-benchmark layout: extra columns, quotes kept verbatim
        rows = ["genre\tscore\tsentence1\tsentence2"] + [f"news\t{s}\t{a}\t{b}" for a, b, s in PAIRS]
        rows[1] = 'news\t3.8\t"the cat plays music\ta cat sings'
        path.write_text("\n".join(rows) + "\n")
    else:
        _jsonl(path, [{"sentence1": a, "sentence2": b, "score": s} for a, b, s in PAIRS])
    return path


@pytest.mark.parametrize("suffix", [".tsv", ".jsonl"])
def test_similarity_equals_scipy_on_independent_cosines(embedder, tmp_path, suffix):
    pairs = read_pairs(_write_pairs(tmp_path / f"pairs{suffix}"))
    first = '"the cat plays music' if suffix == ".tsv" else "the cat plays music"
    assert pairs.sentence1[0] == first and pairs.sentence2[-1] == "the child is happy"
    np.testing.assert_array_equal(pairs.scores, [s for _, _, s in PAIRS])
    got = evaluate_similarity(lambda t: embedder.encode(t, instruction=INSTRUCTION, progress=False), pairs)
    a = embedder.encode(pairs.sentence1, instruction=INSTRUCTION, progress=False).astype(np.float64)
    b = embedder.encode(pairs.sentence2, instruction=INSTRUCTION, progress=False).astype(np.float64)
    cosines = np.einsum("nd,nd->n", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert got["pairs"] == len(PAIRS)
    assert got["spearman"] == pytest.approx(stats.spearmanr(cosines, pairs.scores)[0], abs=1e-6)
    assert got["pearson"] == pytest.approx(stats.pearsonr(cosines, pairs.scores)[0], abs=1e-6)


def test_correlations_by_hand():
    """Spearman = Pearson of the ranks (ties: mean rank); both by numpy alone."""
    predicted, gold = np.array([0.1, 0.4, 0.4, 0.9, 0.3]), np.array([1.0, 2.0, 5.0, 4.0, 3.0])
    got = correlations(predicted, gold)
    assert got["pearson"] == pytest.approx(np.corrcoef(predicted, gold)[0, 1], abs=1e-12)
    ranks = np.array([1, 3.5, 3.5, 5, 2])
    assert got["spearman"] == pytest.approx(np.corrcoef(ranks, gold)[0, 1], abs=1e-12)


@pytest.mark.parametrize("content,needles", [
    ("sentence1\tsentence2\n", ["pairs.tsv:1", "missing score"]),
    ("sentence1\tsentence2\tscore\na\tb\t1\nc\td\n", ["pairs.tsv:3", "expected 3 tab-separated fields"]),
    ("sentence1\tsentence2\tscore\na\tb\t1\nc\td\tx\n", ["pairs.tsv:3", "score must be a number"]),
    ("sentence1\tsentence2\tscore\na\tb\t1\nc\td\t1\n", ["every gold score is 1.0"]),
])
def test_bad_pairs(tmp_path, content, needles):
    path = tmp_path / "pairs.tsv"
    path.write_text(content)
    with pytest.raises(InputError) as e:
        read_pairs(path)
    for needle in needles:
        assert needle in str(e.value), str(e.value)


def test_cli_similarity(model_dir, embedder, tmp_path, capsys):
    path, out = _write_pairs(tmp_path / "pairs.jsonl"), tmp_path / "sts.json"
    assert cli(["evaluate", "similarity", "--model", str(model_dir), "--data", str(path), "--output", str(out),
                "--batch-size", "4", "--max-length", "64"]) == 0
    record = json.loads(out.read_text())
    want = evaluate_similarity(lambda t: embedder.encode(t, progress=False), read_pairs(path))
    assert record["pairs"] == len(PAIRS) and record["instruction"] is None
    assert record["metrics"] == pytest.approx({"spearman": want["spearman"], "pearson": want["pearson"]}, abs=1e-6)
    assert "| Spearman | Pearson |" in capsys.readouterr().out


# --- MTEB --------------------------------------------------------------------------------------------

def _mteb_task(corpus, queries, qrels):
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    class TinyRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name="DiffembTinyRetrieval", type="Retrieval", main_score="ndcg_at_10",
            description="A tiny offline retrieval task for testing the diffemb-jax MTEB encoder.",
            reference="https://github.com/embeddings-benchmark/mteb",
            dataset={"path": "diffemb/tiny-retrieval", "revision": "local"}, category="t2t",
            eval_splits=["test"], eval_langs=["eng-Latn"], date=("2025-01-01", "2025-01-01"), dialect=["Written"],
            domains=[], task_subtypes=[], license="cc-by-4.0", annotations_creators="derived",
            modalities=["text"], sample_creation="found", bibtex_citation="")

        def load_data(self, num_proc=None, **kwargs):
            split = RetrievalSplitData(
                corpus=Dataset.from_list([{"id": str(d["_id"]), "title": d.get("title") or "", "text": d["text"]}
                                          for d in corpus]),
                queries=Dataset.from_list([{"id": q["_id"], "text": q["text"]} for q in queries]),
                relevant_docs={q: dict(docs) for q, docs in qrels.items()},
                top_ranked=None)
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return TinyRetrieval()


def test_mteb_encoder_equals_evaluate_embedder(embedder, tmp_path):
    mteb = pytest.importorskip("mteb")
    from diffemb_jax.evaluation.mteb_encoder import MTEBEncoder

    data = load_beir(write_beir(tmp_path / "beir"))
    want = evaluate_embedder(lambda t: embedder.encode(t, instruction=INSTRUCTION, progress=False),
                             lambda t: embedder.encode(t, progress=False), data.queries, data.corpus, data.qrels)
    encoder = MTEBEncoder(embedder, query_instruction=INSTRUCTION)
    from mteb.models.models_protocols import EncoderProtocol

    assert isinstance(encoder, EncoderProtocol)
    result = mteb.evaluate(encoder, _mteb_task(CORPUS, QUERIES, data.qrels), cache=None, show_progress_bar=False,
                           encode_kwargs={"batch_size": 3})
    scores = result.task_results[0].scores["test"][0]
    assert scores["ndcg_at_10"] == pytest.approx(want["ndcg@10"], abs=1e-4)
    assert scores["mrr_at_10"] == pytest.approx(want["mrr@10"], abs=1e-4)
    assert 0.0 < want["ndcg@10"] < 1.0  # a real ranking, not a degenerate one


def test_mteb_encoder_instructions(embedder):
    pytest.importorskip("mteb")
    from mteb.types import PromptType

    from diffemb_jax.evaluation.mteb_encoder import MTEBEncoder

    meta = _mteb_task([], [], {}).metadata
    fixed = MTEBEncoder(embedder, query_instruction="find it")
    assert fixed.instruction_for(meta, PromptType.query) == "find it"
    assert fixed.instruction_for(meta, None) == "find it"
    assert fixed.instruction_for(meta, PromptType.document) is None
    by_task = MTEBEncoder(embedder, instructions={"DiffembTinyRetrieval": "task one", "Retrieval": "any"})
    assert by_task.instruction_for(meta, PromptType.query) == "task one"
    assert by_task.instruction_for(meta, PromptType.document) is None
    assert MTEBEncoder(embedder, instructions={"Retrieval": "any"}).instruction_for(meta, "query") == "any"
    assert MTEBEncoder(embedder, query_instruction="").instruction_for(meta, PromptType.query) is None
    assert MTEBEncoder(embedder).mteb_model_meta.similarity_fn_name == "cosine"
