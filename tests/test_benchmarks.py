"""The paper's benchmark runners (LongEmbed, BRIGHT, FollowIR) on fixtures in the layouts of their
dataset repositories: scores equal an independent brute-force search scored by ir_measures
(trectools), p-MRR equals mteb's own, bad fixtures get clear errors, the HF cache is read offline,
and `diffemb evaluate longembed|bright|followir` runs end to end on a tiny converted model."""

import json
import math
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tiny
from diffemb_jax.checkpoints import convert
from diffemb_jax.cli import main as cli
from diffemb_jax.embedding.files import InputError
from diffemb_jax.evaluation import bright, followir, hub_data, longembed

ir_measures = pytest.importorskip("ir_measures")
TRECTOOLS = ir_measures.providers.registry["trectools"]
VOCAB = [f"w{i}" for i in range(40)]
DIM = 64


class BagOfWords:
    """A deterministic stand-in embedder: hashed word counts, L2-normalised. Records instructions."""

    def __init__(self):
        self.instructions = []

    def encode(self, texts, instruction=None):
        self.instructions.append(instruction)
        return np.stack([bag(t) for t in texts])


def bag(text):
    """Word counts plus a small component unique to the text, so that no two scores tie (rankers
    order ties differently; trec_eval by doc id)."""
    v = np.random.default_rng(zlib.crc32(text.encode())).standard_normal(DIM).astype(np.float32) * 0.05
    for word in text.split():
        v[zlib.crc32(word.encode()) % DIM] += 1
    return v / np.linalg.norm(v)


def make_task(rng, n_docs=12, n_queries=5, prefix="", doc_words=12):
    """Random documents; each query takes words of its gold document (first n_queries docs) and noise."""
    corpus = {f"{prefix}d{i}": " ".join(rng.choice(VOCAB, doc_words)) for i in range(n_docs)}
    queries, qrels = {}, {}
    for i in range(n_queries):
        gold = corpus[f"{prefix}d{i}"].split()
        queries[f"{prefix}q{i}"] = " ".join(list(rng.choice(gold, 3)) + list(rng.choice(VOCAB, 3)))
        qrels[f"{prefix}q{i}"] = {f"{prefix}d{i}": 1}
    return queries, corpus, qrels


def brute_force_run(queries, corpus, qrels, top_k, excluded=None):
    """The oracle run: every judged query against every non-excluded document, numpy scores."""
    excluded = excluded or {}
    run = {}
    for qid in qrels:
        scores = {d: float(bag(queries[qid]) @ bag(text)) for d, text in corpus.items() if d not in excluded.get(qid, ())}
        best = sorted(scores.items(), key=lambda item: -item[1])[:top_k]
        run[qid] = dict(best)
    return run


def ir_measures_mean(measure, qrels, run):
    """Mean over judged queries by trectools through ir_measures (its NaN, 0/0 when nothing relevant is
    retrieved within the cut, counts 0 as trec_eval counts it)."""
    per_query = {m.query_id: m.value for m in TRECTOOLS.iter_calc([measure], qrels, run)}
    return sum(0.0 if math.isnan(per_query.get(q, 0.0)) else per_query.get(q, 0.0) for q in qrels) / len(qrels)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def card(configs):
    """A dataset card whose YAML header lists {config: {split: path}}, as the Hub's repositories do."""
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split, path in splits.items():
            lines += [f"  - split: {split}", f"    path: \"{path}\""]
    return "\n".join(lines + ["---", "", "# fixture"]) + "\n"


# ----------------------------------------------------------------------------- LongEmbed


def write_longembed(root, rng, lengths=(256, 512), real=("narrativeqa", "qmsum")):
    """dwzhu/LongEmbed's layout: CONFIG/{corpus,queries,qrels}.jsonl, listed in the card."""
    configs, truth = {}, {}
    for config in real:
        queries, corpus, qrels = make_task(rng, prefix=config[:2])
        write_jsonl(root / config / "corpus.jsonl", [{"doc_id": d, "text": t} for d, t in corpus.items()])
        write_jsonl(root / config / "queries.jsonl", [{"qid": q, "text": t} for q, t in queries.items()])
        write_jsonl(root / config / "qrels.jsonl", [{"qid": q, "doc_id": d} for q, j in qrels.items() for d in j])
        configs[config] = {s: f"{config}/{s}.jsonl" for s in ("corpus", "queries", "qrels")}
        truth[config] = {None: (queries, corpus, qrels)}
    for config in ("passkey", "needle"):
        rows = {"corpus": [], "queries": [], "qrels": []}
        truth[config] = {}
        for n in lengths:
            queries, corpus, qrels = make_task(rng, n_docs=5, n_queries=5, prefix=f"{config[0]}{n}")
            rows["corpus"] += [{"doc_id": d, "text": t, "context_length": n} for d, t in corpus.items()]
            rows["queries"] += [{"qid": q, "text": t, "context_length": n} for q, t in queries.items()]
            rows["qrels"] += [{"qid": q, "doc_id": d, "context_length": n} for q, j in qrels.items() for d in j]
            truth[config][n] = (queries, corpus, qrels)
        for split, split_rows in rows.items():
            write_jsonl(root / config / f"{split}.jsonl", split_rows)
        configs[config] = {s: f"{config}/{s}.jsonl" for s in rows}
    (root / "README.md").write_text(card(configs))
    return truth


def test_longembed_equals_brute_force_scored_by_ir_measures(tmp_path):
    truth = write_longembed(tmp_path / "LongEmbed", np.random.default_rng(0))
    embedder = BagOfWords()
    tasks = ["Passkey", "Needle", "NarrativeQA", "QMSum"]
    data = longembed.load_longembed(tmp_path / "LongEmbed", tasks, [256, 512])
    result = longembed.score_longembed(embedder, data)

    for task in tasks:
        config = longembed.TASKS[task]
        expected = []
        for queries, corpus, qrels in truth[config].values():
            run = brute_force_run(queries, corpus, qrels, top_k=100)
            measure = ir_measures.nDCG @ (1 if task in longembed.SYNTHETIC else 10)
            expected.append(ir_measures_mean(measure, qrels, run))
        assert result.scores[task] == pytest.approx(np.mean(expected), abs=1e-9), task
        if task in longembed.SYNTHETIC:
            assert list(result.by_length[task]) == [256, 512]
            np.testing.assert_allclose(list(result.by_length[task].values()), expected, atol=1e-9)
    assert 0 < result.average < 1
    assert result.sizes["Passkey"] == {"queries": 10, "documents": 10}
    assert set(embedder.instructions) == {longembed.INSTRUCTION, None}  # queries instructed, documents not
    table = longembed.table(result)
    assert "| diffemb-jax (this run) |" in table and "Passkey, nDCG@1 by context length" in table
    assert "paper" not in table  # the paper's average covers all six tasks


def test_longembed_errors(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "LongEmbed"
    write_longembed(root, rng)
    with pytest.raises(ValueError, match="unknown LongEmbed task"):
        longembed.load_longembed(root, ["Passkey", "NQA"])
    with pytest.raises(ValueError, match="context lengths must be among"):
        longembed.load_longembed(root, ["Passkey"], [300])
    with pytest.raises(InputError, match="config '2wikimqa', split 'corpus'"):
        longembed.load_longembed(root, ["2WikiMQA"])

    (root / "qmsum" / "qrels.jsonl").unlink()  # the card lists it; the file is gone
    with pytest.raises(InputError, match="config 'qmsum', split 'qrels'"):
        longembed.load_longembed(root, ["QMSum"])

    write_jsonl(root / "narrativeqa" / "qrels.jsonl", [{"qid": "ghost", "doc_id": "nad0"}])
    with pytest.raises(InputError, match=r"NarrativeQA .*judged query id 'ghost' is not among the 5 queries"):
        longembed.load_longembed(root, ["NarrativeQA"])

    write_jsonl(root / "passkey" / "corpus.jsonl", [])
    with pytest.raises(InputError, match=r"Passkey .*context length 256: the corpus is empty"):
        longembed.load_longembed(root, ["Passkey"], [256])

    write_jsonl(root / "needle" / "queries.jsonl", [{"qid": "x", "text": "y"}])  # no context_length
    with pytest.raises(InputError, match="no field 'context_length'"):
        longembed.load_longembed(root, ["Needle"], [256])


def test_dataset_from_the_hf_cache_offline(tmp_path, monkeypatch):
    """A repository id resolves to its snapshot in the HF cache (the layout huggingface_hub writes);
    one not cached is an error that says how to get it, and nothing is downloaded."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "datasets--dwzhu--LongEmbed"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    write_longembed(repo / "snapshots" / commit, np.random.default_rng(2))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    assert hub_data.open_dataset("dwzhu/LongEmbed") == repo / "snapshots" / commit
    data = longembed.load_longembed("dwzhu/LongEmbed", ["NarrativeQA"])
    assert len(data["NarrativeQA"][None].corpus) == 12
    with pytest.raises(InputError, match="not in the Hugging Face cache .*hf download xlangai/BRIGHT"):
        hub_data.open_dataset("xlangai/BRIGHT")
    with pytest.raises(InputError, match="no such folder"):
        hub_data.open_dataset(str(tmp_path / "missing" / "folder"))


# ----------------------------------------------------------------------------- BRIGHT


def write_bright(root, rng, domains=("biology", "theoremqa_questions")):
    """xlangai/BRIGHT's layout without a card: CONFIG/DOMAIN-00000-of-00001.parquet."""
    truth = {}
    for domain in domains:
        queries, corpus, qrels = make_task(rng, n_docs=30, n_queries=6, prefix=domain[:3])
        # Each query's excluded document copies the query: it would rank first if not excluded.
        excluded = {q: [f"{q}-leak"] for q in list(queries)[:3]}
        for q in excluded:
            corpus[f"{q}-leak"] = queries[q]
        examples = [{"id": q, "query": t, "gold_ids": list(qrels[q]), "gold_ids_long": ["N/A"],
                     "excluded_ids": excluded.get(q, ["N/A"]), "reasoning": "r"} for q, t in queries.items()]
        examples.append({"id": "unjudged", "query": "w1 w2", "gold_ids": [], "gold_ids_long": [],
                         "excluded_ids": ["N/A"], "reasoning": ""})
        write_parquet(root / "documents" / f"{domain}-00000-of-00001.parquet",
                      [{"id": d, "content": t} for d, t in corpus.items()])
        write_parquet(root / "examples" / f"{domain}-00000-of-00001.parquet", examples)
        truth[domain] = (queries, corpus, qrels, excluded)
    return truth


def test_bright_applies_excluded_ids_and_equals_ir_measures(tmp_path):
    truth = write_bright(tmp_path / "BRIGHT", np.random.default_rng(3))
    embedder = BagOfWords()
    data = bright.load_bright(tmp_path / "BRIGHT", ["biology", "theoremqa_questions"])
    result = bright.score_bright(embedder, data, top_k=20)
    for domain, (queries, corpus, qrels, excluded) in truth.items():
        run = brute_force_run(queries, corpus, qrels, top_k=20, excluded=excluded)
        assert result.metrics[domain]["ndcg@10"] == pytest.approx(
            ir_measures_mean(ir_measures.nDCG @ 10, qrels, run), abs=1e-9)
        assert result.metrics[domain]["ndcg@10"] < 1
        assert result.sizes[domain] == {"queries": 6, "documents": 33}
        without_exclusion = brute_force_run(queries, corpus, qrels, top_k=20)
        assert ir_measures_mean(ir_measures.nDCG @ 10, qrels, without_exclusion) != pytest.approx(
            result.metrics[domain]["ndcg@10"])  # the leaks would have changed the score
    assert embedder.instructions == [bright.DOMAINS["biology"][1], None,
                                     bright.DOMAINS["theoremqa_questions"][1], None]
    rows = _table_rows(bright.table(result))
    assert rows[""] == ["Bio.", "TheoQ.", "Avg"]
    assert rows["DiffEmbed (Dream-7B), paper, after 10.9k ReasonAug samples"] == ["–", "48.3", "–"]
    assert rows["Qwen2.5-7B, paper, after 10.9k ReasonAug samples"] == ["–", "40.2", "–"]
    assert not any("Figure 1c" in label for label in rows)  # its average covers all twelve domains, not two
    ours = rows["diffemb-jax (this run)"]
    assert ours[1] == f"{100 * result.metrics['theoremqa_questions']['ndcg@10']:.1f}"


def test_bright_paper_averages_sit_in_rows_of_their_own_beside_a_full_run():
    result = bright.BrightResult(metrics={d: {"ndcg@10": 0.1} for d in bright.DOMAINS}, sizes={}, long=False)
    rows = _table_rows(bright.table(result))
    average = rows[""].index("Avg")
    assert rows["DiffEmbed (Dream-7B), paper Figure 1c (BRIGHT average)"][average] == "33.0"
    assert rows["LLM2Vec-adapted LLM, paper Figure 1c (BRIGHT average)"][average] == "25.0"
    theorem = rows[""].index("TheoQ.")
    assert rows["LLM2Vec-adapted LLM, paper Figure 1c (BRIGHT average)"][theorem] == "–"  # another baseline's number
    assert rows["Qwen2.5-7B, paper, after 10.9k ReasonAug samples"][average] == "–"


def _table_rows(table: str) -> dict[str, list[str]]:
    """A markdown table's rows by their first cell (the header's is "")."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not set(line) <= set("|-: "):
            rows[cells[0]] = cells[1:]
    return rows


def test_bright_errors(tmp_path):
    root = tmp_path / "BRIGHT"
    write_bright(root, np.random.default_rng(4), domains=("biology",))
    with pytest.raises(InputError, match="config 'documents', split 'economics'"):
        bright.load_bright(root, ["economics"])
    with pytest.raises(ValueError, match="unknown BRIGHT domain.*for long documents"):
        bright.load_bright(root, ["leetcode"], long=True)
    rows = pq.read_table(root / "examples" / "biology-00000-of-00001.parquet").to_pylist()
    rows[0]["gold_ids"] = ["nowhere"]
    write_parquet(root / "examples" / "biology-00000-of-00001.parquet", rows)
    with pytest.raises(InputError, match="document 'nowhere' judged for query 'bioq0' is not in the corpus"):
        bright.load_bright(root, ["biology"])


# ----------------------------------------------------------------------------- FollowIR


def write_followir_task(folder, rng, with_card, prefix):
    """MTEB's FollowIR layout: configs corpus, queries, default (qrels), instruction, top_ranked and
    qrel_diff (split qrel_diff); query ids <id>-og / <id>-changed."""
    corpus = {f"{prefix}d{i}": " ".join(rng.choice(VOCAB, 10)) for i in range(24)}
    queries, instructions, qrels, top_ranked, diff = [], [], [], [], []
    for i in range(4):
        qid, docs = f"{prefix}{i}", list(rng.choice(list(corpus), 10, replace=False))
        relevant = docs[:4]
        text = " ".join(rng.choice(corpus[relevant[0]].split(), 3))
        og = " ".join(rng.choice(" ".join(corpus[d] for d in relevant).split(), 4))
        changed = " ".join(rng.choice(" ".join(corpus[d] for d in relevant[2:]).split(), 4))
        for kind, instruction, rel in (("-og", og, relevant), ("-changed", changed, relevant[2:])):
            queries.append({"_id": qid + kind, "text": text})
            instructions.append({"query-id": qid + kind, "instruction": instruction})
            qrels += [{"query-id": qid + kind, "corpus-id": d, "score": 1} for d in rel]
            qrels += [{"query-id": qid + kind, "corpus-id": d, "score": 0} for d in docs if d not in rel]
            top_ranked.append({"query-id": qid + kind, "corpus-ids": docs})
        diff.append({"query-id": qid, "corpus-ids": relevant[:2]})
    corpus_rows = [{"_id": d, "title": "", "text": t} for d, t in corpus.items()]
    if with_card:
        write_parquet(folder / "corpus" / "test-00000-of-00001.parquet", corpus_rows)
        write_jsonl(folder / "queries" / "test.jsonl", queries)
        write_jsonl(folder / "data" / "test.jsonl", qrels)
        write_jsonl(folder / "instruction" / "test.jsonl", instructions)
        write_parquet(folder / "top_ranked" / "test-00000-of-00001.parquet", top_ranked)
        write_jsonl(folder / "qrel_diff" / "qrel_diff.jsonl", diff)
        (folder / "README.md").write_text(card({
            "corpus": {"test": "corpus/test-*.parquet"}, "queries": {"test": "queries/test.jsonl"},
            "default": {"test": "data/test.jsonl"}, "instruction": {"test": "instruction/test.jsonl"},
            "top_ranked": {"test": "top_ranked/test-*"}, "qrel_diff": {"qrel_diff": "qrel_diff/qrel_diff.jsonl"}}))
    else:  # folder conventions only; the qrels under a "qrels" config
        write_jsonl(folder / "corpus" / "test.jsonl", corpus_rows)
        write_jsonl(folder / "queries" / "test.jsonl", [{**q, "instruction": i["instruction"]}
                                                        for q, i in zip(queries, instructions)])
        write_jsonl(folder / "qrels" / "test.jsonl", qrels)
        write_jsonl(folder / "top_ranked" / "test.jsonl", top_ranked)
        write_jsonl(folder / "qrel_diff" / "qrel_diff.jsonl", diff)
    texts = {q["_id"]: f"{q['text']} {i['instruction']}" for q, i in zip(queries, instructions)}
    qrels_dict = {}
    for r in qrels:
        qrels_dict.setdefault(r["query-id"], {})[r["corpus-id"]] = r["score"]
    return texts, corpus, qrels_dict, {r["query-id"]: r["corpus-ids"] for r in top_ranked}, \
        {r["query-id"]: r["corpus-ids"] for r in diff}


def test_followir_equals_mteb_p_mrr_and_ir_measures(tmp_path):
    from mteb._evaluators.retrieval_metrics import calculate_pmrr

    rng = np.random.default_rng(5)
    truth = {"Core17": write_followir_task(tmp_path / "FollowIR" / "Core17InstructionRetrieval", rng, True, "c"),
             "News21": write_followir_task(tmp_path / "FollowIR" / "news21", rng, False, "n")}
    embedder = BagOfWords()
    result = followir.score_followir(embedder, followir.load_followir(tmp_path / "FollowIR", ["Core17", "News21"]))
    for task, (texts, corpus, qrels, top_ranked, diff) in truth.items():
        run = {q: {d: float(bag(texts[q]) @ bag(corpus[d])) for d in docs} for q, docs in top_ranked.items()}
        og_qrels = {q: j for q, j in qrels.items() if q.endswith("-og")}
        measure = ir_measures.AP @ 1000 if task == "Core17" else ir_measures.nDCG @ 5
        og_run = {q: r for q, r in run.items() if q.endswith("-og")}
        assert result.scores[task]["base"] == pytest.approx(ir_measures_mean(measure, og_qrels, og_run), abs=1e-9)
        expected_p_mrr = calculate_pmrr(og_run, {q: r for q, r in run.items() if q.endswith("-changed")}, diff)
        assert result.scores[task]["p-MRR"] == pytest.approx(expected_p_mrr, abs=1e-12)
        assert result.scores[task]["p-MRR"] != 0
    assert set(embedder.instructions) == {followir.INSTRUCTION, None}
    table = followir.table(result)
    assert "| | Core17 MAP@1000 | Core17 p-MRR | News21 nDCG@5 | News21 p-MRR | Avg score | Avg p-MRR |" in table


def test_p_mrr_with_ties_and_unranked_documents_equals_mteb():
    """Oracle: mteb's calculate_pmrr; ties are ordered by doc id descending, unranked docs rank last."""
    from mteb._evaluators.retrieval_metrics import calculate_pmrr

    rng = np.random.default_rng(6)
    docs = [f"d{i}" for i in range(30)]
    og, new, changed = {}, {}, {}
    for q in range(8):
        og[str(q)] = {d: float(rng.integers(0, 5)) for d in rng.choice(docs, 20, replace=False)}
        new[str(q)] = {d: float(rng.integers(0, 5)) for d in rng.choice(docs, 20, replace=False)}
        changed[str(q)] = list(rng.choice(docs, 3, replace=False))
    expected = calculate_pmrr({q + "-og": r for q, r in og.items()}, {q + "-changed": r for q, r in new.items()},
                              changed)
    assert followir.p_mrr(og, new, changed) == pytest.approx(expected, abs=1e-12)


def test_followir_errors(tmp_path):
    rng = np.random.default_rng(7)
    root = tmp_path / "FollowIR"
    write_followir_task(root / "core17", rng, False, "c")
    with pytest.raises(InputError, match="no subfolder Robust04InstructionRetrieval"):
        followir.load_followir(root, ["Robust04"])
    with pytest.raises(InputError, match="no such folder"):
        followir.load_followir(tmp_path / "nothing", ["Core17"])
    write_jsonl(root / "core17" / "top_ranked" / "test.jsonl", [{"query-id": "c0-og", "corpus-ids": ["zzz"]}])
    with pytest.raises(InputError, match="document 'zzz' top_ranked for query 'c0-og' is not in the corpus"):
        followir.load_followir(root, ["Core17"])
    (root / "core17" / "qrels" / "test.jsonl").unlink()
    with pytest.raises(InputError, match="config 'qrels', split 'test'"):
        followir.load_followir(root, ["Core17"])


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    return convert(tiny.write_checkpoint("qwen2", root / "hf"), root / "converted", progress=False)


@pytest.mark.parametrize("benchmark", ["longembed", "bright", "followir"])
def test_cli_benchmarks_end_to_end(benchmark, model_dir, tmp_path, capsys):
    rng = np.random.default_rng(8)
    data = tmp_path / benchmark
    if benchmark == "longembed":
        write_longembed(data, rng, real=("narrativeqa", "qmsum", "2wikimqa", "summ_screen_fd"))
        extra = ["--lengths", "256", "512"]
    elif benchmark == "bright":
        write_bright(data, rng)
        extra = ["--domains", "biology", "theoremqa_questions"]
    else:
        write_followir_task(data / "Core17InstructionRetrieval", rng, True, "c")
        extra = ["--tasks", "Core17"]
    out = tmp_path / "result.json"
    max_length = {"longembed": ["--max-length", "64"]}.get(benchmark, [])  # the others: their defaults
    argv = ["evaluate", benchmark, "--model", str(model_dir), "--data", str(data), *max_length,
            "--batch-size", "8", "--output", str(out), *extra]
    assert cli(argv) == 0
    printed = capsys.readouterr().out
    assert "| diffemb-jax (this run) |" in printed
    report = json.loads(out.read_text())
    assert report["task"] == benchmark
    assert report["max_length"] == {"longembed": 64, "bright": 4096, "followir": 512}[benchmark]
    if benchmark == "longembed":
        assert set(report["metrics"]["ndcg@10 (real) / mean ndcg@1 (synthetic)"]) == set(longembed.TASKS)
        assert "DiffEmbed (Dream-7B), paper" in printed  # all six tasks: the paper's average beside ours
    elif benchmark == "bright":
        assert set(report["metrics"]) == {"biology", "theoremqa_questions"}
    else:
        assert set(report["metrics"]["Core17"]) == {"base", "changed_base", "p-MRR"}

    # Bad data: exit 2 with the data's error, before any model is loaded.
    argv[argv.index(str(model_dir))] = str(tmp_path / "no-model")
    argv[argv.index(str(data))] = str(tmp_path / "no-data")
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "no-data" in err and "no-model" not in err
