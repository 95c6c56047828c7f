"""The bench's texts: docstrings of the standard library's public functions and methods (the corpus
of the demo's stdlib task, evaluation/stdlib_task.py), real prose and code from a line to pages long:
texts to embed, (query, positive, hard negative) triples, and long documents."""

from __future__ import annotations

import ast
import itertools

from diffemb_jax.errors import ConfigError
from diffemb_jax.evaluation.stdlib_task import first_sentence, public_functions


def docstrings() -> dict[str, str]:
    """Distinct docstrings of the stdlib task's functions, in a fixed order, each with the name of
    the first function that has it."""
    docs = {}
    for _, _, node, _ in public_functions():
        doc = ast.get_docstring(node)
        if doc and doc.strip():
            docs.setdefault(doc.strip(), node.name)
    return docs


def fit(tokenizer, text: str, max_length: int) -> str:
    """`text` cut at a token boundary so that it tokenizes to at most max_length tokens."""
    keep = max_length
    while text and len((enc := tokenizer.encode(text)).ids) > max_length:
        text = text[: max((end for _, end in enc.offsets[:keep]), default=0)].rstrip()
        keep -= 1
    return text


def make_texts(tokenizer, n: int, max_length: int) -> list[str]:
    texts = list(itertools.islice(filter(None, (fit(tokenizer, doc, max_length) for doc in docstrings())), n))
    if len(texts) < n:
        raise ConfigError(f"--texts {n}: there are only {len(texts)} distinct texts to bench with")
    return texts


def token_count(tokenizer, texts: list[str], max_length: int) -> int:
    return sum(min(len(enc.ids), max_length) for enc in tokenizer.encode_batch(texts))


def make_triples(n: int) -> list[tuple[str, str, str]]:
    """(query, positive, hard negative): a docstring's first sentence, the docstring, and the next
    docstring (most often of the same module)."""
    docs = list(docstrings().items())
    if len(docs) < 2 * n:
        raise ConfigError(f"--queries {n}: there are only {len(docs)} distinct texts, enough for "
                         f"{len(docs) // 2} (query, positive, negative) triples")
    return [(first_sentence(*docs[2 * i]), docs[2 * i][0], docs[2 * i + 1][0]) for i in range(n)]


def padded(tokenizer, texts: list[str], length: int) -> dict[str, list[list[int]]]:
    """Token ids cut to `length` and right-padded to the longest of them (as llm2vec's batches are),
    with their 0/1 padding mask (JSON lists)."""
    rows = [enc.ids[:length] for enc in tokenizer.encode_batch(texts)]
    longest = max(map(len, rows))
    return {"input_ids": [row + [0] * (longest - len(row)) for row in rows],
            "padding_mask": [[1] * len(row) + [0] * (longest - len(row)) for row in rows]}


def long_document(tokenizer, length: int) -> str:
    """The docstrings one after another until past `length` tokens, then cut to at most `length`:
    one long document of real prose and code."""
    docs = "\n\n".join(docstrings())
    text = docs
    while len(tokenizer.encode(text).ids) <= length:
        text += "\n\n" + docs
    return fit(tokenizer, text, length)
