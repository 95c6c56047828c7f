"""The installed-packages code corpus: torch never read, split by package with no code in both
splits, BM25 hard negatives from train, well-formed long documents, the cache reused.

Small explicit package lists keep it fast; torch is asked for and must be refused.
"""

import ast
import json
import sysconfig
import tokenize
from pathlib import Path

import bm25s
import numpy as np
import pytest

from diffemb_jax.evaluation import code_corpus
from diffemb_jax.evaluation.code_corpus import (Package, build_code_corpus, installed_packages, long_documents_test,
                                                package_of, write_text_corpus)
from diffemb_jax.evaluation.stdlib_task import MIN_QUERY_WORDS, extract_functions, function_source

TRAIN = ("email", "idna", "json", "six")
TEST = ("tqdm",)
TORCH = ("torch", "functorch", "torchgen")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("DIFFEMB_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def corpus(cache):
    return build_code_corpus(TRAIN + TEST + TORCH, TEST)


@pytest.fixture(scope="module")
def text_corpus(cache, tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.jsonl"
    n = write_text_corpus(path, TRAIN + TEST + TORCH, TEST)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(records) == n > 0
    return records


def _sources(files) -> list[str]:
    """Whole sources of the public functions of `files`, read without code_corpus."""
    found = []
    for path in files:
        with tokenize.open(path) as f:
            source = f.read()
        lines = source.splitlines()
        found += [function_source(node, lines) for _, node in extract_functions("m", ast.parse(source), lines, 10**9)]
    return found


def _torch_files():
    root = Path(sysconfig.get_paths()["purelib"]) / "torch"
    files = [root / "functional.py", root / "serialization.py"]
    if not all(f.is_file() for f in files):
        pytest.skip("torch is not installed here")
    return files


def test_torch_is_never_read(corpus, text_corpus, cache):
    assert not [n for n in installed_packages() if n.startswith("torch") or n in TORCH]
    names = corpus.train_packages + corpus.test_packages
    assert set(names) == set(TRAIN + TEST)
    assert not [f.id for f in corpus.functions if package_of(f).startswith(TORCH)]
    assert not [p for p in (cache / "code-corpus").iterdir() if p.name.startswith(TORCH)]
    torch_code = set(_sources(_torch_files()))
    assert torch_code
    texts = {r["text"] for r in text_corpus}
    documents = set(corpus.test.corpus.values()) | {r[k] for r in corpus.train for k in ("positive", "negative")}
    assert not torch_code & texts
    assert not [t for t in torch_code if any(d in t for d in documents if len(d) > 200)]


def test_split_is_by_package_and_no_code_is_in_both(corpus):
    assert corpus.train and corpus.test.queries
    assert not set(corpus.train_packages) & set(corpus.test_packages)
    package = {f.code: package_of(f) for f in corpus.functions}
    train_code = {r[k] for r in corpus.train for k in ("positive", "negative")}
    assert {package[c] for c in train_code} <= set(corpus.train_packages)
    assert {package_of(f) for f in corpus.functions if f.id in corpus.test.corpus} <= set(corpus.test_packages)
    normalised = lambda texts: {" ".join(t.split()) for t in texts}  # noqa: E731
    assert not normalised(train_code) & normalised(corpus.test.corpus.values())
    assert len(normalised(f.code for f in corpus.functions)) == len(corpus.functions)


def test_queries_are_unambiguous_first_sentences(corpus):
    queries = [r["query"] for r in corpus.train] + list(corpus.test.queries.values())
    assert len(set(queries)) == len(queries)
    assert all("\n" not in q and len(q.split()) >= MIN_QUERY_WORDS for q in queries)
    assert set(corpus.test.qrels) == set(corpus.test.queries)
    assert all(judged == {qid: 1} and qid in corpus.test.corpus for qid, judged in corpus.test.qrels.items())


def test_hard_negatives_come_from_train_and_are_what_bm25_ranks_first(corpus):
    train = [f.code for f in corpus.functions if package_of(f) in corpus.train_packages]
    index = {code: i for i, code in enumerate(train)}
    retriever = bm25s.BM25()
    retriever.index(code_corpus._words(train), show_progress=False)
    rng = np.random.default_rng(0)
    negative_scores, random_scores = [], []
    for record in corpus.train:
        assert record["negative"] != record["positive"] and record["negative"] in index
        scores = retriever.get_scores(code_corpus._words([record["query"]])[0])
        positive, negative = index[record["positive"]], index[record["negative"]]
        best = np.delete(scores, positive).max()
        if best > 0:  # else a random function of the package stood in
            assert scores[negative] == pytest.approx(best, rel=1e-5)
        negative_scores.append(scores[negative])
        random_scores.append(scores[rng.choice([i for i in range(len(train)) if i != positive])])
    assert np.mean(negative_scores) > 2 * np.mean(random_scores)


def test_cap_per_package_and_seeded_test_packages(cache):
    capped = build_code_corpus(TRAIN + TEST, TEST, max_per_package=15)
    counts = {}
    for f in capped.functions:
        counts[package_of(f)] = counts.get(package_of(f), 0) + 1
    assert max(counts.values()) <= 15 and set(counts) == set(TRAIN + TEST)
    drawn = build_code_corpus(TRAIN + TEST, 2, seed=3)
    assert drawn == build_code_corpus(TRAIN + TEST, 2, seed=3)
    assert len(drawn.test_packages) == 2 and not set(drawn.test_packages) & set(drawn.train_packages)


def test_text_corpus_is_train_functions_only(text_corpus):
    assert all(set(r) == {"text"} and r["text"].strip() for r in text_corpus)
    tqdm = Path(sysconfig.get_paths()["purelib"]) / "tqdm"
    test_sources = set(_sources(sorted(tqdm.rglob("*.py"))))
    assert test_sources and not test_sources & {r["text"] for r in text_corpus}
    assert all(r["text"].startswith(("def ", "async def ", "@")) for r in text_corpus)
    uncapped = build_code_corpus(TRAIN + TEST, TEST, max_per_package=10**9)
    assert len(text_corpus) == sum(package_of(f) in uncapped.train_packages for f in uncapped.functions)


def test_long_documents_are_whole_modules_without_their_docstring(cache):
    long = long_documents_test(("email", "tqdm"), min_chars=2000, max_chars=9000)
    assert long.queries and len(long.corpus) >= len(long.queries)
    assert set(long.qrels) == set(long.queries)
    assert len(set(long.queries.values())) == len(long.queries)
    for qid, query in long.queries.items():
        assert long.qrels[qid] == {qid: 1} and len(query.split()) >= MIN_QUERY_WORDS
        assert query not in " ".join(long.corpus[qid].split())
    for docid, text in long.corpus.items():
        assert 2000 <= len(text) <= 9000 and docid.split(".")[0] in ("email", "tqdm")


def test_second_build_reads_the_cache(corpus, cache, monkeypatch):
    monkeypatch.setattr(code_corpus, "_extract", lambda *a: pytest.fail("parsed again instead of reading the cache"))
    assert build_code_corpus(TRAIN + TEST, TEST) == corpus


def test_files_skip_tests_vendored_big_and_unparsable(tmp_path):
    pkg = tmp_path / "pkg"
    for name in ("__init__.py", "ok.py", "bad.py", "tests/helper.py", "_vendor/lib.py", "test_x.py", "x_test.py",
                 "big.py"):
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text('def public_function(x):\n    """Return the value of x unchanged."""\n    return x\n')
    (pkg / "bad.py").write_text("def broken(:\n")
    (pkg / "big.py").write_text("x = 1\n" * (code_corpus.MAX_FILE_BYTES // 6 + 1))
    package = Package("pkg", tmp_path, "0")
    files = code_corpus._files(package)
    assert sorted(p.name for p in files) == ["__init__.py", "bad.py", "ok.py"]
    with code_corpus.tqdm(disable=True) as bar:
        extracted = code_corpus._extract(package, files, 1500, bar)
    assert [f[0] for f in extracted["functions"]] == ["pkg:public_function", "pkg.ok:public_function"]
