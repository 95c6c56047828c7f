"""A small real retrieval task, docstring -> code, built offline from Python's own standard library.

Every public function and method of a fixed list of pure-Python stdlib modules gives a query
(the first sentence of its docstring) and a document (its source without the docstring,
dedented, capped at max_doc_chars). Modules are split into train and test, so no module is in
both. Train records have the layout of the echo training data (query, positive, hard negative
from the same module, instruction); test is a RetrievalSet whose corpus is every test-split
function, documented or not.

Filters, applied in this order: functions whose docstring cannot be cut out cleanly (it shares a
line with code) or whose body is only a docstring are skipped; a document whose text equals an
earlier one up to whitespace is dropped; a first sentence of fewer than MIN_QUERY_WORDS words gives no query; a
query text shared by two functions is ambiguous and given to neither.
"""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
import tokenize
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from diffemb_jax import atomic
from diffemb_jax.evaluation.retrieval import RetrievalSet

INSTRUCTION = "Given a description of a Python function, retrieve its code"
MIN_QUERY_WORDS = 4

# Pure-Python modules whose source is stable across CPython releases; a name missing on the
# running Python is skipped. datetime.py is the pure version up to 3.11, _pydatetime from 3.12
# (datetime.py then has no functions of its own, so it drops out by itself).
MODULES = (
    "_pydatetime", "_pydecimal", "argparse", "base64", "bisect", "calendar", "colorsys",
    "configparser", "copy", "csv", "dataclasses", "datetime", "difflib", "email.feedparser",
    "email.generator", "email.header", "email.message", "email.utils", "fnmatch", "fractions",
    "ftplib", "gettext", "glob", "heapq", "http.cookies", "imaplib", "ipaddress", "json.decoder",
    "json.encoder", "locale", "logging", "mailbox", "mimetypes", "netrc", "numbers", "optparse",
    "pathlib", "platform", "plistlib", "poplib", "pprint", "quopri", "random", "sched", "shlex",
    "shutil", "smtplib", "statistics", "string", "tarfile", "tempfile", "textwrap", "traceback",
    "wave", "zipfile",
)


@dataclass(frozen=True)
class Function:
    """One extracted function; id is "module:qualname", query is None when it has none."""

    id: str
    module: str
    query: str | None
    code: str


@dataclass(frozen=True)
class TrainAndTest:
    """train: echo-format records; test: the held-out units as a retrieval set."""

    train: list[dict]
    test: RetrievalSet

    def write_train_jsonl(self, path: str | Path) -> None:
        """Write the train records one JSON object a line, atomically (temp file, then rename)."""
        write_jsonl(path, self.train)


@dataclass(frozen=True)
class StdlibTask(TrainAndTest):
    """Split by module."""

    train_modules: tuple[str, ...]
    test_modules: tuple[str, ...]
    functions: tuple[Function, ...]  # every extracted function of both splits


def write_jsonl(path: str | Path, records) -> None:
    """One JSON object a line, atomically (temp file, then rename)."""
    atomic.write_file(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                      text=True)


def build_stdlib_task(seed: int = 0, max_doc_chars: int = 1500, test_fraction: float = 0.25) -> StdlibTask:
    """Extract, filter, split by module; the same seed on the same Python gives the same task."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    functions = deduplicate(_extract_all(max_doc_chars))
    modules = sorted({f.module for f in functions})
    random.Random(seed).shuffle(modules)
    n_test = min(len(modules) - 1, max(1, round(test_fraction * len(modules))))
    test_modules, train_modules = set(modules[:n_test]), set(modules[n_test:])
    return StdlibTask(
        train=_train_records([f for f in functions if f.module in train_modules], seed),
        test=retrieval_set([f for f in functions if f.module in test_modules]),
        train_modules=tuple(sorted(train_modules)),
        test_modules=tuple(sorted(test_modules)),
        functions=tuple(functions),
    )


def first_sentence(docstring: str, name: str) -> str:
    """Text up to the first '.' followed by whitespace or the end, within the first paragraph.

    Leading paragraphs that are call signatures of the function itself ("wrap(text) -> [str]")
    are skipped: they name the function instead of describing it.
    """
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", docstring.strip())]
    signature = f"{name}("
    paragraph = next((p for p in paragraphs if not p.startswith(signature)), "")
    match = re.match(r"(.*?\.)(?:\s|$)", paragraph)
    return match.group(1) if match else paragraph


def public_functions(modules: tuple[str, ...] = MODULES):
    """(module, qualname, node, the module's source lines) of every public function and method of
    `modules` that the running Python has, in order: the standard library as a corpus, read from
    source (this task's functions; the bench's texts are their docstrings)."""
    for module, tree, lines in _parsed(modules):
        for qualname, node in _public_functions(tree):
            yield module, qualname, node, lines


def _parsed(modules: tuple[str, ...]):
    """(module, syntax tree, source lines) of each of `modules` that the running Python has."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for module in modules:
        path = _module_path(stdlib, module)
        if path is not None:
            with tokenize.open(path) as f:
                source = f.read()
            yield module, ast.parse(source), source.splitlines()


def _extract_all(max_doc_chars: int) -> list[Function]:
    return [f for module, tree, lines in _parsed(MODULES)
            for f, _ in extract_functions(module, tree, lines, max_doc_chars)]


def extract_functions(module: str, tree: ast.Module, lines: list[str], max_doc_chars: int):
    """(Function, its node) for each public function of one parsed module whose docstring cuts out
    cleanly, the first of a repeated qualname only; the node lets a caller take more from it."""
    seen = set()
    for qualname, node in _public_functions(tree):
        code = _code_without_docstring(node, lines)
        if code is None or qualname in seen:
            continue
        seen.add(qualname)
        yield Function(f"{module}:{qualname}", module, query_of(ast.get_docstring(node), node.name),
                       cap(code, max_doc_chars)), node


def query_of(docstring: str | None, name: str) -> str | None:
    """The docstring's first sentence, or None when there is none of MIN_QUERY_WORDS words or more."""
    query = first_sentence(docstring, name) if docstring else None
    return query if query is not None and len(query.split()) >= MIN_QUERY_WORDS else None


def _module_path(stdlib: Path, module: str) -> Path | None:
    base = stdlib.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _public_functions(tree: ast.Module):
    """(qualname, node) for public top-level functions and public methods of public top-level classes."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_"):
                    yield f"{node.name}.{item.name}", item


def _code_without_docstring(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> str | None:
    """The function's lines (decorators included) minus its docstring lines, dedented; None if not clean."""
    keep = _function_lines(node)
    if ast.get_docstring(node, clean=False) is not None:
        doc = node.body[0]
        if len(node.body) == 1 or not owns_its_lines(doc, lines) or node.body[1].lineno == doc.end_lineno:
            return None
        keep = [i for i in keep if not doc.lineno - 1 <= i < doc.end_lineno]
    return _dedented(node, lines, keep)


def function_source(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> str:
    """The function's lines, decorators and docstring included, dedented."""
    return _dedented(node, lines, _function_lines(node))


def _function_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[int]:
    start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
    return list(range(start, node.end_lineno))


def _dedented(node: ast.stmt, lines: list[str], keep: list[int]) -> str:
    width = node.col_offset
    code = [lines[i][width:] if not lines[i][:width].strip() else lines[i] for i in keep]
    return "\n".join(code).strip("\n").rstrip()


def owns_its_lines(doc: ast.stmt, lines: list[str]) -> bool:
    """Whether the statement `doc` has its lines to itself (nothing but a comment shares them)."""
    before = lines[doc.lineno - 1][:doc.col_offset]
    after = lines[doc.end_lineno - 1][doc.end_col_offset:].strip()
    return not before.strip() and (not after or after.startswith("#"))


def cap(code: str, max_chars: int) -> str:
    """At most max_chars characters, cut at a line end when one falls inside the limit."""
    if len(code) <= max_chars:
        return code
    cut = code[:max_chars]
    return cut[:cut.rindex("\n")] if "\n" in cut else cut


def deduplicate(functions: list[Function]) -> list[Function]:
    """The first of each code text up to whitespace; a query shared by two of those is given to neither."""
    seen_code, unique = set(), []
    for f in functions:
        key = " ".join(f.code.split())
        if key not in seen_code:
            seen_code.add(key)
            unique.append(f)
    counts = Counter(f.query for f in unique if f.query is not None)
    return [f if f.query is None or counts[f.query] == 1 else Function(f.id, f.module, None, f.code)
            for f in unique]


def _train_records(functions: list[Function], seed: int) -> list[dict]:
    """One triplet per documented function; the negative is another function of its module."""
    rng = random.Random(f"negatives-{seed}")
    by_module = defaultdict(list)
    for f in functions:
        by_module[f.module].append(f)
    records = []
    for f in functions:
        others = [g for g in by_module[f.module] if g is not f]
        if f.query is None or not others:
            continue
        records.append({"query": f.query, "positive": f.code, "negative": rng.choice(others).code,
                        "instruction": INSTRUCTION})
    return records


def retrieval_set(functions: list[Function]) -> RetrievalSet:
    """Each documented function's query judged against its own code; every function is in the corpus."""
    documented = [f for f in functions if f.query is not None]
    return RetrievalSet(queries={f.id: f.query for f in documented},
                        corpus={f.id: f.code for f in functions},
                        qrels={f.id: {f.id: 1} for f in documented})
