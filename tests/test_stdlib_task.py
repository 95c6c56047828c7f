"""The stdlib docstring -> code task: deterministic, split by module, clean queries and documents."""

import ast
import json
import sysconfig
import textwrap
import tokenize
from pathlib import Path

import pytest

from diffemb_jax.evaluation.stdlib_task import (INSTRUCTION, MODULES, _code_without_docstring, _module_path,
                                                _public_functions, build_stdlib_task, first_sentence)


@pytest.fixture(scope="module")
def task():
    return build_stdlib_task(seed=0)


@pytest.fixture(scope="module")
def uncapped():
    """Documents whole, so each one parses as Python."""
    return build_stdlib_task(seed=0, max_doc_chars=10**9)


def _module(function_id: str) -> str:
    return function_id.split(":")[0]


def test_same_seed_same_task_and_other_seed_other_split(task):
    assert build_stdlib_task(seed=0) == task
    assert build_stdlib_task(seed=1).test_modules != task.test_modules


def test_split_is_by_module(task):
    assert task.train and task.test.queries
    assert not set(task.train_modules) & set(task.test_modules)
    module_of_code = {f.code: f.module for f in task.functions}
    assert {module_of_code[r["positive"]] for r in task.train} <= set(task.train_modules)
    assert {_module(i) for i in task.test.corpus} <= set(task.test_modules)
    test_functions = [f for f in task.functions if f.module in task.test_modules]
    assert set(task.test.corpus) == {f.id for f in test_functions}


def test_test_set_judges_each_query_against_its_own_code(task):
    assert set(task.test.qrels) == set(task.test.queries)
    code = {f.id: f.code for f in task.functions}
    for qid, judged in task.test.qrels.items():
        assert judged == {qid: 1}
        assert task.test.corpus[qid] == code[qid]


def test_queries_are_first_sentences(task):
    queries = [r["query"] for r in task.train] + list(task.test.queries.values())
    assert len(set(queries)) == len(queries)
    for query in queries:
        assert "\n" not in query and len(query.split()) >= 4
        assert query.endswith(".") or ". " not in query


def test_first_sentence():
    assert first_sentence("Do a thing.  Then more.\n\nDetails.", "f") == "Do a thing."
    assert first_sentence("Do a thing\nacross lines\n\nDetails. More.", "f") == "Do a thing across lines"
    assert first_sentence("f(x) -> int\n\nReturn x as an int.", "f") == "Return x as an int."
    assert first_sentence("Use 3.5 or later. Ok.", "f") == "Use 3.5 or later."


def test_documents_are_code_without_their_docstring(uncapped):
    docstrings = _stdlib_docstrings()
    for f in uncapped.functions:
        tree = ast.parse(f.code)
        node = tree.body[0]
        assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)), f.id
        assert ast.get_docstring(node) is None, f.id
        docstring = docstrings.get(f.id)
        if docstring and len(docstring) > 40:
            assert docstring not in f.code, f.id


def _stdlib_docstrings():
    """{function id: raw docstring} read again from the stdlib sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found = {}
    for module in MODULES:
        path = _module_path(stdlib, module)
        if path is not None:
            with tokenize.open(path) as f:
                tree = ast.parse(f.read())
            for qualname, node in _public_functions(tree):
                found.setdefault(f"{module}:{qualname}", ast.get_docstring(node, clean=False))
    return found


def test_documents_are_capped_and_start_dedented(task):
    for f in task.functions:
        assert len(f.code) <= 1500
        assert "def " in f.code
        assert f.code.startswith(("def ", "async def ", "@")), f.id
    assert max(len(f.code) for f in build_stdlib_task(max_doc_chars=300).functions) <= 300


def test_negative_is_another_function_of_the_same_module(task):
    module_of_code = {f.code: f.module for f in task.functions}
    for record in task.train:
        assert record["negative"] != record["positive"]
        assert module_of_code[record["negative"]] == module_of_code[record["positive"]]
        assert record["instruction"] == INSTRUCTION


def test_train_jsonl_round_trips(task, tmp_path):
    path = tmp_path / "train.jsonl"
    task.write_train_jsonl(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == task.train
    assert set(json.loads(lines[0])) == {"query", "positive", "negative", "instruction"}
    assert [p.name for p in tmp_path.iterdir()] == ["train.jsonl"]


def test_code_keeps_its_body_when_the_docstring_is_removed():
    source = textwrap.dedent('''
        class A:
            @staticmethod
            def f(x):
                """Doc
                on two lines."""
                # comment
                return x
    ''')
    node = ast.parse(source).body[0].body[0]
    assert _code_without_docstring(node, source.splitlines()) == "@staticmethod\ndef f(x):\n    # comment\n    return x"
