"""A retrieval set from a local folder in BEIR's format, checked line by line.

    folder/corpus.jsonl      {"_id": ..., "title": ..., "text": ...} one document a line
    folder/queries.jsonl     {"_id": ..., "text": ...} one query a line
    folder/qrels/SPLIT.tsv   query-id <TAB> corpus-id <TAB> score, under that header line

A document's text is its title and text joined by a space when it has a title, else its text,
stripped of surrounding white space (as BEIR and MTEB join them). Ids may be JSON strings or
integers and are kept as strings. Every judged query and document must exist; a query without
judgments is kept in `queries` but never scored. Blank lines are skipped. Errors are InputErrors
that name the file and line and say what to do.
"""

from __future__ import annotations

from pathlib import Path

from diffemb_jax.embedding.files import InputError, jsonl_objects, nonblank_lines
from diffemb_jax.evaluation.retrieval import Qrels, RetrievalSet

QRELS_HEADER = ("query-id", "corpus-id", "score")


def load_beir(folder: str | Path, split: str = "test") -> RetrievalSet:
    """Read corpus.jsonl, queries.jsonl and qrels/{split}.tsv from a BEIR-format folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder; expected a BEIR folder with corpus.jsonl, queries.jsonl "
                         "and qrels/")
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        found = sorted(p.stem for p in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
        hint = f"splits found: {', '.join(found)}; pick one with --split" if found else "no qrels/*.tsv at all"
        raise InputError(f"{qrels_path}: no such file (relevance judgments of split {split!r}); {hint}")
    corpus = _read_corpus(folder / "corpus.jsonl")
    queries = _read_queries(folder / "queries.jsonl")
    qrels = _read_qrels(qrels_path, queries, corpus)
    return RetrievalSet(queries=queries, corpus=corpus, qrels=qrels)


def document_text(title: str | None, text: str) -> str:
    """BEIR's document: "title text" when there is a title, else the text; stripped."""
    return f"{title} {text}".strip() if title else text.strip()


def _read_corpus(path: Path) -> dict[str, str]:
    corpus: dict[str, str] = {}
    for number, record in jsonl_objects(path):
        docid = _id(path, number, record)
        text = _string(path, number, record, "text")
        title = record.get("title")
        if title is not None and not isinstance(title, str):
            raise InputError(f"{path}:{number}: field \"title\" must be a string or null, got {type(title).__name__}")
        if docid in corpus:
            raise InputError(f"{path}:{number}: document id {docid!r} appears twice; ids must be unique")
        document = document_text(title, text)
        if not document:
            raise InputError(f"{path}:{number}: document {docid!r} has neither title nor text; fill or remove it")
        corpus[docid] = document
    if not corpus:
        raise InputError(f"{path}: the corpus is empty; it needs at least one document")
    return corpus


def _read_queries(path: Path) -> dict[str, str]:
    queries: dict[str, str] = {}
    for number, record in jsonl_objects(path):
        qid = _id(path, number, record)
        text = _string(path, number, record, "text").strip()
        if qid in queries:
            raise InputError(f"{path}:{number}: query id {qid!r} appears twice; ids must be unique")
        if not text:
            raise InputError(f"{path}:{number}: query {qid!r} has an empty text; fill or remove it")
        queries[qid] = text
    if not queries:
        raise InputError(f"{path}: there are no queries")
    return queries


def _read_qrels(path: Path, queries: dict[str, str], corpus: dict[str, str]) -> Qrels:
    qrels: Qrels = {}
    for index, (number, line) in enumerate(nonblank_lines(path)):
        fields = [f.strip() for f in (line.split("\t") if "\t" in line else line.split())]
        if index == 0 and tuple(f.lower() for f in fields) == QRELS_HEADER:
            continue
        if len(fields) != 3:
            raise InputError(f"{path}:{number}: expected 3 tab-separated fields (query-id, corpus-id, score), "
                             f"got {len(fields)}: {line!r}")
        qid, docid, score = fields
        try:
            relevance = int(score)
        except ValueError:
            raise InputError(f"{path}:{number}: score {score!r} is not an integer relevance grade") from None
        if qid not in queries:
            raise InputError(f"{path}:{number}: query id {qid!r} is not in {path.parent.parent / 'queries.jsonl'}")
        if docid not in corpus:
            raise InputError(f"{path}:{number}: corpus id {docid!r} is not in {path.parent.parent / 'corpus.jsonl'}")
        judged = qrels.setdefault(qid, {})
        if docid in judged and judged[docid] != relevance:
            raise InputError(f"{path}:{number}: query {qid!r} judges document {docid!r} twice, "
                             f"as {judged[docid]} and as {relevance}; keep one")
        judged[docid] = relevance
    if not qrels:
        raise InputError(f"{path}: no relevance judgments; expected lines 'query-id<TAB>corpus-id<TAB>score'")
    return qrels


def _id(path: Path, number: int, record: dict) -> str:
    value = record.get("_id")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise InputError(f"{path}:{number}: expected a non-empty string field \"_id\"")
    return str(value)


def _string(path: Path, number: int, record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise InputError(f"{path}:{number}: expected a string field \"{key}\"")
    return value
