"""Semantic textual similarity: cosine of the two sentences' embeddings against gold scores.

Pairs come from a .tsv with a header line naming (at least) the columns sentence1, sentence2 and
score, in any order (the STS-benchmark layout of sentence-transformers reads as is), or from a
.jsonl with one object a line holding those three fields. Scores are correlated with Spearman's
rank correlation (ties get their mean rank) and Pearson's, both from scipy.stats, as MTEB reports
STS; they are fractions in [-1, 1], not percentages.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from diffemb_jax.embedding.files import InputError

COLUMNS = ("sentence1", "sentence2", "score")


@dataclass(frozen=True)
class Pairs:
    sentence1: list[str]
    sentence2: list[str]
    scores: np.ndarray  # gold, float64 [n]


def read_pairs(path: str | Path) -> Pairs:
    """Sentence pairs with gold scores from a .tsv (header sentence1, sentence2, score) or a .jsonl."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.suffix not in (".tsv", ".jsonl"):
        raise InputError(f"{path}: pairs must be .tsv (header with sentence1, sentence2, score) or .jsonl")
    rows = _tsv_rows(path) if path.suffix == ".tsv" else _jsonl_rows(path)
    s1, s2, scores = [], [], []
    for number, a, b, score in rows:
        if not a.strip() or not b.strip():
            raise InputError(f"{path}:{number}: empty sentence; every pair needs two texts")
        s1.append(a)
        s2.append(b)
        scores.append(score)
    if len(scores) < 2:
        raise InputError(f"{path}: {len(scores)} pair(s); a correlation needs at least 2")
    gold = np.asarray(scores, np.float64)
    if np.all(gold == gold[0]):
        raise InputError(f"{path}: every gold score is {gold[0]}; a correlation needs scores that differ")
    return Pairs(s1, s2, gold)


def _score(path: Path, number: int, value) -> float:
    if isinstance(value, bool):
        raise InputError(f"{path}:{number}: score must be a number, got {value!r}")
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{path}:{number}: score must be a number, got {value!r}") from None
    if not math.isfinite(score):
        raise InputError(f"{path}:{number}: score must be finite, got {value!r}")
    return score


def _decoded_lines(path: Path):
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{number}: not valid UTF-8 ({e.reason} at byte {e.start})") from e


def _tsv_rows(path: Path):
    lines = ((n, line) for n, line in _decoded_lines(path) if line.strip())
    first = next(lines, None)
    if first is None:
        raise InputError(f"{path}: the file is empty")
    header = [h.strip().lower() for h in first[1].split("\t")]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise InputError(f"{path}:{first[0]}: the header must name the tab-separated columns sentence1, sentence2 "
                         f"and score; missing {', '.join(missing)}")
    where = [header.index(c) for c in COLUMNS]
    for number, line in lines:
        fields = next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE))
        if len(fields) != len(header):
            raise InputError(f"{path}:{number}: expected {len(header)} tab-separated fields as in the header, "
                             f"got {len(fields)}")
        a, b, score = (fields[i] for i in where)
        yield number, a, b, _score(path, number, score)


def _jsonl_rows(path: Path):
    for number, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in COLUMNS[:2]):
            raise InputError(f"{path}:{number}: expected an object with string fields \"sentence1\", \"sentence2\" "
                             "and a number \"score\"")
        yield number, record["sentence1"], record["sentence2"], _score(path, number, record.get("score"))


def cosine_scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two [n, D] arrays (normalised here, whatever the input)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two [n, D] arrays of one shape, got {a.shape} and {b.shape}")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    if np.any(norms == 0):
        raise ValueError("a zero vector has no cosine")
    return np.sum(a * b, axis=1) / norms


def correlations(predicted: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """{"spearman", "pearson"} of predicted against gold scores."""
    predicted = np.asarray(predicted, np.float64)
    gold = np.asarray(gold, np.float64)
    if predicted.shape != gold.shape or predicted.ndim != 1 or len(gold) < 2:
        raise ValueError(f"need two [n >= 2] score vectors of one length, got {predicted.shape} and {gold.shape}")
    for name, values in (("predicted", predicted), ("gold", gold)):
        if np.all(values == values[0]):
            raise ValueError(f"every {name} score is {values[0]}; the correlation is undefined")
    return {"spearman": float(stats.spearmanr(predicted, gold).statistic),
            "pearson": float(stats.pearsonr(predicted, gold).statistic)}


def evaluate_similarity(encode: Callable[[list[str]], np.ndarray], pairs: Pairs) -> dict[str, float | int]:
    """Encode every distinct sentence once, score each pair by cosine, correlate with the gold scores.

    Returns {"spearman", "pearson", "pairs"}.
    """
    texts = list(dict.fromkeys(pairs.sentence1 + pairs.sentence2))
    vectors = np.asarray(encode(texts))
    if vectors.ndim != 2 or len(vectors) != len(texts):
        raise ValueError(f"encode returned shape {vectors.shape} for {len(texts)} texts; expected [n, D]")
    row = {t: i for i, t in enumerate(texts)}
    a = vectors[[row[t] for t in pairs.sentence1]]
    b = vectors[[row[t] for t in pairs.sentence2]]
    return correlations(cosine_scores(a, b), pairs.scores) | {"pairs": len(pairs.scores)}
