"""A docstring -> code retrieval task from the Python source of every installed package and of the
standard library: stdlib_task's queries and documents (the same extraction and filters), tens of
thousands of them instead of five hundred, split by package.

The unit is a top-level package or module (`scipy`, `email`, `six`): one is in train or in test, never
both, and the test list is fixed (DEFAULT_TEST_PACKAGES) or drawn with a seed. torch, and every
torch* top-level or one a torch distribution installs (functorch, torchgen), is never read: it is
kept for evaluation from outside the project. Nor are diffemb_jax itself, test folders and files,
vendored copies and files over MAX_FILE_BYTES. A package gives at most max_per_package functions (a
seeded sample), so transformers does not make up half the task. A code text (up to whitespace) is
kept once over all packages, so none is in both splits; hard negatives are the train documents that
BM25 ranks first for the query.

Each package's extraction is cached (cache_dir()/code-corpus), keyed by its name, distribution
versions, files (count, bytes, newest mtime), the Python and the parameters, and written atomically:
a second build reads JSON instead of parsing some 15,000 files.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import logging
import random
import re
import sys
import sysconfig
import tokenize
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import bm25s
from tqdm import tqdm

from diffemb_jax import atomic
from diffemb_jax.cache import cache_dir
from diffemb_jax.errors import UserError
from diffemb_jax.evaluation.retrieval import RetrievalSet
from diffemb_jax.evaluation.stdlib_task import (INSTRUCTION, Function, TrainAndTest, cap, deduplicate,
                                                extract_functions, function_source, owns_its_lines, query_of,
                                                retrieval_set, write_jsonl)

log = logging.getLogger(__name__)

# From the project's own dependencies (scipy, optax, tqdm; huggingface_hub through transformers),
# so they are installed wherever it is: code of four styles (numerical, JAX, web client, terminal).
DEFAULT_TEST_PACKAGES = ("huggingface_hub", "optax", "scipy", "tqdm")
EXCLUDED_DIRS = frozenset({"test", "tests", "_vendor", "__pycache__", "site-packages", "dist-packages"})
MAX_FILE_BYTES = 1 << 20
MAX_DOC_CHARS = 1500
_FORMAT = 1  # of the cache files; bump when their content changes


@dataclass(frozen=True)
class Package:
    """A top-level package or module: its name, the folder holding it, and what its source depends on."""

    name: str
    root: Path
    version: str  # its distributions' versions, or the Python's for the standard library


@dataclass(frozen=True)
class CodeCorpus(TrainAndTest):
    """Split by package."""

    train_packages: tuple[str, ...]
    test_packages: tuple[str, ...]
    functions: tuple[Function, ...]  # every kept function of both splits

    @property
    def sizes(self) -> dict[str, int]:
        return {"train_packages": len(self.train_packages), "test_packages": len(self.test_packages),
                "functions": len(self.functions), "train_triplets": len(self.train),
                "test_queries": len(self.test.queries), "test_docs": len(self.test.corpus)}


def build_code_corpus(packages: Sequence[str] | None = None,
                      test_packages: Sequence[str] | int = DEFAULT_TEST_PACKAGES, *, max_per_package: int = 1000,
                      max_doc_chars: int = MAX_DOC_CHARS, seed: int = 0) -> CodeCorpus:
    """packages: names to read (default every installed one); test_packages: names, or how many to
    draw with `seed`. The same arguments in the same environment give the same corpus."""
    found, train_names, test_names = _split(packages, test_packages, seed)
    kept = _functions([found[n] for n in train_names + test_names], max_doc_chars, max_per_package, seed)
    functions = [f for f, _ in kept]
    train, test = set(train_names), set(test_names)
    return CodeCorpus(train=_train_records([f for f in functions if package_of(f) in train], seed),
                      test=retrieval_set([f for f in functions if package_of(f) in test]),
                      train_packages=tuple(train_names), test_packages=tuple(test_names),
                      functions=tuple(functions))


def write_text_corpus(path: str | Path, packages: Sequence[str] | None = None,
                      test_packages: Sequence[str] = DEFAULT_TEST_PACKAGES, *, max_chars: int = 8000,
                      max_doc_chars: int = MAX_DOC_CHARS) -> int:
    """JSONL {"text": source} of every kept function of the train packages, docstring included, for
    masked-LM adaptation; test packages are read only so that code they share is left out. Returns
    the number of records."""
    found, train_names, test_names = _split(packages, test_packages, 0)
    kept = _functions([found[n] for n in train_names + test_names], max_doc_chars, None, 0)
    train = set(train_names)
    records = [{"text": cap(source, max_chars)} for f, source in kept if package_of(f) in train]
    write_jsonl(path, records)
    return len(records)


def long_documents_test(test_packages: Sequence[str] = DEFAULT_TEST_PACKAGES, *, min_chars: int = 4000,
                        max_chars: int = 24000, max_doc_chars: int = MAX_DOC_CHARS) -> RetrievalSet:
    """Whole modules of the test packages as documents (module docstring removed, cut at max_chars;
    at 3-4 characters a token of code, ~1k-8k tokens), the first sentence of that docstring as the
    query; modules under min_chars are left out. Filters as for functions. max_doc_chars only picks
    the cached extraction to reuse."""
    found = installed_packages()
    extracted = _extract_all([found[n] for n in _known(test_packages, found)], max_doc_chars)
    documents = []
    for package in extracted.values():
        for module, path, query, doc_lines in package["modules"]:
            with tokenize.open(path) as f:
                lines = f.read().splitlines()
            if doc_lines:
                del lines[doc_lines[0] - 1:doc_lines[1]]
            text = cap("\n".join(lines).strip("\n"), max_chars)
            if len(text) >= min_chars:
                documents.append(Function(module, module, query, text))
    return retrieval_set(deduplicate(documents))


def package_of(function: Function) -> str:
    return function.module.split(".")[0]


def installed_packages() -> dict[str, Package]:
    """Every readable top-level package or module, by name: the standard library's, then
    site-packages' (a name the standard library has is not taken again), the excluded left out."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    python = sys.version.split()[0]
    found = {name: Package(name, stdlib, f"python-{python}") for name in _top_level(stdlib)}
    owners = _owners()
    roots = dict.fromkeys(Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib"))
    for root in roots:
        for name in _top_level(root):
            dists = sorted(set(owners.get(name, ())))
            if name not in found and not _excluded(name):
                versions = ",".join(f"{d}=={importlib.metadata.version(d)}" for d in dists)
                found[name] = Package(name, root, versions or "unknown")
    return found


def _excluded(name: str) -> bool:
    return (name.startswith("torch") or name == "diffemb_jax"
            or any(d.lower().startswith("torch") or d == "diffemb-jax" for d in _owners().get(name, ())))


@cache
def _owners() -> dict[str, list[str]]:
    """{top-level name: the distributions that install it}."""
    return importlib.metadata.packages_distributions()


def _top_level(root: Path) -> list[str]:
    names = []
    for entry in sorted(root.iterdir()) if root.is_dir() else ():
        name = entry.name[:-3] if entry.is_file() and entry.name.endswith(".py") else entry.name
        if (name.isidentifier() and not name.startswith("__") and name not in EXCLUDED_DIRS
                and (entry.is_file() and name != entry.name or entry.is_dir())):
            names.append(name)
    return names


def _files(package: Package) -> list[Path]:
    """The package's .py files, without test folders and files, vendored copies, or files over MAX_FILE_BYTES."""
    single = package.root / f"{package.name}.py"
    paths = [single] if single.is_file() else sorted((package.root / package.name).rglob("*.py"))
    return [p for p in paths
            if not EXCLUDED_DIRS & set(p.relative_to(package.root).parts[:-1])
            and not (p.name.startswith("test_") or p.name.endswith("_test.py") or p.name == "conftest.py")
            and p.stat().st_size <= MAX_FILE_BYTES]


def _split(packages: Sequence[str] | None, test_packages: Sequence[str] | int,
           seed: int) -> tuple[dict[str, Package], list[str], list[str]]:
    """(installed_packages(), train names, test names), each sorted; the default test list keeps
    the names installed here."""
    found = installed_packages()
    names = sorted(found) if packages is None else _known(packages, found)
    if isinstance(test_packages, int):
        test = random.Random(f"test-packages-{seed}").sample(names, min(test_packages, len(names) - 1))
    elif test_packages is DEFAULT_TEST_PACKAGES:
        test = [n for n in test_packages if n in names]
    else:
        test = _known(test_packages, found)
        if missing := set(test) - set(names):
            raise UserError(f"test packages {sorted(missing)} are not among the packages to read")
    train = sorted(set(names) - set(test))
    if not train or not test:
        raise UserError(f"need at least one train and one test package; got train {train}, test {sorted(test)}")
    return found, train, sorted(test)


def _known(names: Sequence[str], found: dict[str, Package]) -> list[str]:
    """`names` that may be read, sorted; the excluded are dropped with a warning, unknown ones refused."""
    excluded = sorted(n for n in names if n not in found and _excluded(n))
    if excluded:
        log.warning("never read: %s", ", ".join(excluded))
    if unknown := sorted(set(names) - set(found) - set(excluded)):
        raise UserError(f"no installed package or module named {', '.join(unknown)}; "
                         f"see code_corpus.installed_packages() for the names")
    return sorted(set(names) - set(excluded))


def _functions(packages: list[Package], max_doc_chars: int, max_per_package: int | None,
               seed: int) -> list[tuple[Function, str]]:
    """(function, its whole source) of `packages`, deduplicated over all of them, then at most
    max_per_package a package (a seeded sample, in order)."""
    extracted = _extract_all(packages, max_doc_chars)
    functions, sources = [], {}
    for name in extracted:
        for fid, module, query, code, source in extracted[name]["functions"]:
            functions.append(Function(fid, module, query, code))
            sources[fid] = source
    by_package = defaultdict(list)
    for f in deduplicate(functions):
        by_package[package_of(f)].append(f)
    kept = []
    for name in extracted:
        group = by_package[name]
        if max_per_package is not None and len(group) > max_per_package:
            chosen = random.Random(f"{seed}-{name}").sample(range(len(group)), max_per_package)
            group = [group[i] for i in sorted(chosen)]
        kept.extend((f, sources[f.id]) for f in group)
    return kept


def _extract_all(packages: list[Package], max_doc_chars: int) -> dict[str, dict]:
    """Each package's extraction, from the cache where it is there; one progress bar over the files read."""
    done, todo = {}, []
    for package in packages:
        files = _files(package)
        path = _cache_path(package, files, max_doc_chars)
        if path.is_file():
            done[package.name] = json.loads(path.read_text(encoding="utf-8"))
        else:
            todo.append((package, files, path))
    with tqdm(total=sum(len(files) for _, files, _ in todo), desc="code corpus: parsing", unit="file",
              disable=not todo) as bar:
        for package, files, path in todo:
            done[package.name] = _extract(package, files, max_doc_chars, bar)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_file(path, lambda f: json.dump(done[package.name], f, ensure_ascii=False), text=True)
    return done


def _cache_path(package: Package, files: list[Path], max_doc_chars: int) -> Path:
    stats = [p.stat() for p in files]
    key = json.dumps([_FORMAT, package.name, package.version, str(package.root), sys.version, max_doc_chars,
                      len(stats), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)])
    return cache_dir() / "code-corpus" / f"{package.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _extract(package: Package, files: list[Path], max_doc_chars: int, bar: tqdm) -> dict:
    """{"functions": [[id, module, query, code, source]], "modules": [[module, path, query, docstring
    lines (first, last) or None]]}; a file that does not parse is skipped."""
    functions, modules = [], []
    for path in files:
        bar.update()
        try:
            with tokenize.open(path) as f:
                source = f.read()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escapes and the like in others' code
                tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError, MemoryError):
            continue
        lines = source.splitlines()
        parts = path.relative_to(package.root).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for f, node in extract_functions(module, tree, lines, max_doc_chars):
            functions.append([f.id, f.module, f.query, f.code, function_source(node, lines)])
        doc = tree.body[0] if tree.body and ast.get_docstring(tree, clean=False) is not None else None
        if doc is not None and owns_its_lines(doc, lines):
            modules.append([module, str(path), query_of(ast.get_docstring(tree), ""), [doc.lineno, doc.end_lineno]])
        else:
            modules.append([module, str(path), None, None])
    return {"functions": functions, "modules": modules}


def _train_records(functions: list[Function], seed: int) -> list[dict]:
    """One triplet per documented function; the negative is the train document BM25 ranks first for
    the query other than the positive, else (no word in common) another function of its package."""
    documented = [i for i, f in enumerate(functions) if f.query is not None]
    if not documented or len(functions) < 2:
        return []
    ranked, scores = bm25_top([functions[i].query for i in documented], [f.code for f in functions], k=2)
    rng = random.Random(f"negatives-{seed}")
    by_package = defaultdict(list)
    for i, f in enumerate(functions):
        by_package[package_of(f)].append(i)
    records = []
    for i, top, score in zip(documented, ranked, scores):
        negative = next((int(j) for j, s in zip(top, score) if j != i and s > 0), None)
        if negative is None:
            others = [j for j in by_package[package_of(functions[i])] if j != i]
            if not others:
                continue
            negative = rng.choice(others)
        records.append({"query": functions[i].query, "positive": functions[i].code,
                        "negative": functions[negative].code, "instruction": INSTRUCTION})
    return records


def bm25_top(queries: list[str], documents: list[str], k: int):
    """(indices [Q, k], scores [Q, k]) of the top-k documents by BM25 for each query, identifiers
    split into their words (get_fileName -> get file name) so that prose queries meet code."""
    retriever = bm25s.BM25()
    retriever.index(_words(documents), show_progress=False)
    return retriever.retrieve(_words(queries), k=min(k, len(documents)), show_progress=False)


def _words(texts: list[str]) -> list[list[str]]:
    split = [re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", t).replace("_", " ") for t in texts]
    return bm25s.tokenize(split, stopwords="en", return_ids=False, show_progress=False)
