"""Training triplets from local JSONL, stored once as ArrayRecord and served as resumable, host-sharded batches.

`build_dataset` validates the JSONL rows of one of four formats, normalises them to
{"query", "instruction", "positive", "negatives"} and writes a TFDS dataset in ArrayRecord files
(TFDS writes and reads these without TensorFlow). The output directory is keyed by the inputs' paths,
sizes and mtimes, so building the same inputs again reuses it; TFDS writes into a temporary directory
and renames it into place, so a failed build leaves nothing behind.

`TrainBatches` reads that dataset with grain: a global shuffle per epoch (seeded), global batches
that never straddle two epochs, each host reading and tokenising only its slice of every global batch,
each side padded to its max length; the trainer packs them into the step's rows (batching/step.py). It is
a grain `DatasetIterator`, so its state is grain's (a small JSON dict) and
`grain.checkpoint.CheckpointSave(batches)` saves it with orbax.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
import tokenizers

from diffemb_jax.batching import pad_batch
from diffemb_jax.embedding import prompts
from diffemb_jax.errors import ConfigError, MissingPathError, UserError

logger = logging.getLogger(__name__)

FORMATS = ("echo", "reasonaug", "msmarco_instructions", "simcse")
# simcse: unsupervised SimCSE (llm2vec's step 2): rows {"text", optional "instruction"}; the text is its
# own positive (the two views differ only by dropout), in-batch negatives only, so num_negatives=0.
# Threads reading rows and tokenising ahead of the train step; a small buffer keeps host memory low.
READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)


class BadRowError(UserError):
    """A JSONL row that cannot be used; the message names FILE:LINE and the field."""


class _Rejected(Exception):
    """Why one row was rejected (without its location)."""


# ---------------------------------------------------------------------------------------------------
# Parsing and validating JSONL rows


def _text(row: dict, key: str, *, optional: bool = False) -> str:
    value = row.get(key)
    if optional and value in (None, ""):
        return ""
    if value is None:
        raise _Rejected(f"field {key!r} is missing" if key not in row else f"field {key!r} is null")
    return _non_empty_string(value, key)


def _non_empty_string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _Rejected(f"field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _Rejected(f"field {name!r} is empty")
    return value


def _negatives(row: dict, fmt: str, num_negatives: int) -> list[str]:
    if fmt == "simcse":
        return []
    if fmt != "msmarco_instructions":
        return [_text(row, "negative")]
    if "negatives" not in row:
        raise _Rejected("field 'negatives' is missing")
    negatives = row["negatives"]
    if not isinstance(negatives, list):
        raise _Rejected(f"field 'negatives' must be a list of strings, got {type(negatives).__name__}")
    if len(negatives) < num_negatives:
        raise _Rejected(f"field 'negatives' has {len(negatives)} entries, fewer than num_negatives={num_negatives}")
    return [_non_empty_string(n, f"negatives[{i}]") for i, n in enumerate(negatives[:num_negatives])]


def _parse_row(line: bytes, fmt: str, num_negatives: int) -> dict:
    """One JSONL line of format `fmt` as {"query", "instruction", "positive", "negatives"} (k negatives)."""
    try:
        row = json.loads(line)
    except ValueError as e:  # bad JSON or bad UTF-8
        raise _Rejected(f"not valid JSON ({e})") from None
    if not isinstance(row, dict):
        raise _Rejected(f"expected a JSON object, got {type(row).__name__}")
    if fmt == "simcse":
        text = _text(row, "text")
        return {"query": text, "instruction": _text(row, "instruction", optional=True), "positive": text,
                "negatives": []}
    return {
        "query": _text(row, "query"),
        "instruction": _text(row, "instruction", optional=fmt != "msmarco_instructions"),
        "positive": _text(row, "positive"),
        "negatives": _negatives(row, fmt, num_negatives),
    }


def _read_rows(path: Path, fmt: str, num_negatives: int, skip_bad_rows: bool) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each usable row of one JSONL file; blank lines are ignored.

    A bad row raises BadRowError naming FILE:LINE, or with `skip_bad_rows` is counted, and the count
    is logged once for the file.
    """
    skipped, first_problem = 0, None
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = _parse_row(line, fmt, num_negatives)
            except _Rejected as e:
                problem = f"{path}:{line_no}: {e}"
                if not skip_bad_rows:
                    raise BadRowError(f"{problem}. Fix the row, or pass skip_bad_rows=True to skip bad rows.") from None
                skipped, first_problem = skipped + 1, first_problem or problem
                continue
            yield line_no, record
    if skipped:
        logger.warning("%s: skipped %d bad rows (first: %s)", path, skipped, first_problem)


# ---------------------------------------------------------------------------------------------------
# The TFDS dataset (ArrayRecord, no TensorFlow)

FEATURES = tfds.features.FeaturesDict({
    "query": tfds.features.Text(),
    "instruction": tfds.features.Text(),
    "positive": tfds.features.Text(),
    "negatives": tfds.features.Sequence(tfds.features.Text()),
})


class ContrastivePairs(tfds.core.GeneratorBasedBuilder):
    """Queries with instruction, positive and hard negatives read from local JSONL files."""

    VERSION = tfds.core.Version("1.0.0")
    # Nothing is downloaded, so there is no checksums file next to this code to look for. (Looking for
    # it imports `importlib_resources`, which tfds 4.9.10 uses but does not declare: tensorflow/datasets#11212.)
    code_path = None

    def __init__(self, *, files: Sequence[Path], fmt: str, num_negatives: int, skip_bad_rows: bool, **kwargs):
        self._files, self._fmt = list(files), fmt
        self._num_negatives, self._skip_bad_rows = num_negatives, skip_bad_rows
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        metadata = tfds.core.MetadataDict(format=self._fmt, num_negatives=self._num_negatives)
        return tfds.core.DatasetInfo(builder=self, features=FEATURES, metadata=metadata)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        count = 0
        for file_index, path in enumerate(self._files):
            for line_no, record in _read_rows(path, self._fmt, self._num_negatives, self._skip_bad_rows):
                count += 1
                yield f"{file_index}:{line_no}", record
        if not count:
            raise UserError(f"no usable rows in {', '.join(map(str, self._files))}")


def _fingerprint(files: Sequence[Path], fmt: str, num_negatives: int, skip_bad_rows: bool) -> str:
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = [str(ContrastivePairs.VERSION), fmt, num_negatives, skip_bad_rows, stats]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def _check_build_args(files: Sequence[Path], fmt: str, num_negatives: int) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown training data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not files:
        raise ConfigError("no training files given")
    allowed = {"msmarco_instructions": ("1 or more", num_negatives >= 1),
               "simcse": ("exactly 0 (in-batch negatives only)", num_negatives == 0)}
    wanted, ok = allowed.get(fmt, ("exactly 1", num_negatives == 1))
    if not ok:
        raise ConfigError(f"num_negatives={num_negatives}: format {fmt!r} supports {wanted}")
    for f in files:
        if not f.is_file():
            raise MissingPathError(f"training file {f} does not exist")


def build_dataset(files: Sequence[str | Path], fmt: str, cache_dir: str | Path, *,
                  skip_bad_rows: bool = False, num_negatives: int = 1) -> Path:
    """Build (or reuse) the ArrayRecord TFDS dataset of `files`; returns its directory.

    `fmt` is "echo" or "reasonaug" ({query, positive, negative, instruction?}) or
    "msmarco_instructions" ({query, instruction, positive, negatives: [...]}, the first
    `num_negatives` kept). TFDS shows a progress bar while writing.
    """
    files = [Path(f) for f in files]
    _check_build_args(files, fmt, num_negatives)
    data_dir = Path(cache_dir) / f"{fmt}-{_fingerprint(files, fmt, num_negatives, skip_bad_rows)}"
    builder = ContrastivePairs(files=files, fmt=fmt, num_negatives=num_negatives, skip_bad_rows=skip_bad_rows,
                               data_dir=data_dir, file_format=tfds.core.FileFormat.ARRAY_RECORD)
    builder.download_and_prepare()  # a no-op when the dataset is already there
    return Path(builder.data_dir)


# ---------------------------------------------------------------------------------------------------
# Batches


def _padded(tokenizer: tokenizers.Tokenizer, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    tokens = prompts.tokenize(tokenizer, texts, max_length)
    input_ids, padding_mask, embed_mask = pad_batch(tokens.ids, tokens.embed_lengths, max_length, len(texts))
    return {"input_ids": input_ids, "padding_mask": padding_mask, "embed_mask": embed_mask}


def _encode_batch(records: Sequence[dict], tokenizer: tokenizers.Tokenizer, *, query_max_length: int,
                  doc_max_length: int, num_negatives: int) -> dict[str, dict[str, np.ndarray]]:
    """Stored records -> {"query" [b, Lq], "positive" [b, Ld], "negative" [b*k, Ld]} in the recipe's prompts.

    Query i's negatives are rows i*k .. i*k+k-1 of "negative".
    """
    queries = [prompts.with_instruction(r["query"].decode(), r["instruction"].decode()) for r in records]
    positives = [prompts.with_instruction(r["positive"].decode(), None) for r in records]
    negatives = [prompts.with_instruction(n.decode(), None) for r in records for n in r["negatives"][:num_negatives]]
    return {"query": _padded(tokenizer, queries, query_max_length),
            "positive": _padded(tokenizer, positives, doc_max_length),
            "negative": _padded(tokenizer, negatives, doc_max_length)}


def _host_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    if global_batch_size < 1:
        raise ConfigError(f"global_batch_size={global_batch_size} must be positive")
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if global_batch_size % process_count:
        raise ConfigError(f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}")
    return global_batch_size // process_count


def _open_rows(dataset_dir: str | Path, num_negatives: int):
    builder = tfds.builder_from_directory(str(dataset_dir))
    stored = builder.info.metadata["num_negatives"]
    if num_negatives > stored:
        raise UserError(f"{dataset_dir} holds {stored} negatives per query, fewer than num_negatives={num_negatives};"
                         f" rebuild it with build_dataset(..., num_negatives={num_negatives})")
    return builder.as_data_source(split="train")


class TrainBatches(grain.DatasetIterator):
    """This host's share of every global batch, endlessly, tokenised and padded to fixed shapes.

    Global batch s holds rows s*G .. s*G+G-1 of the epoch's shuffled order (the last G-incomplete
    rows of an epoch are dropped, each epoch is shuffled anew); host p gets rows p*b .. p*b+b-1 of
    it, b = G / process_count, and reads only those. get_state() is grain's {"next_index": step}
    plus the settings that fix the data order, which set_state() checks.
    """

    _closed = True  # until grain's __init__ runs: refused arguments leave nothing for __del__ to close

    def __init__(self, source: str | Path, tokenizer: tokenizers.Tokenizer, *, global_batch_size: int,
                 query_max_length: int, doc_max_length: int, num_negatives: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        host_batch_size = _host_batch_size(global_batch_size, process_index, process_count)
        rows = _open_rows(source, num_negatives)
        steps_per_epoch = len(rows) // global_batch_size
        if not steps_per_epoch:
            raise UserError(f"{source} has {len(rows)} rows, fewer than global_batch_size={global_batch_size}")

        def encode(records):
            return _encode_batch(records, tokenizer, query_max_length=query_max_length,
                                 doc_max_length=doc_max_length, num_negatives=num_negatives)

        epoch = grain.MapDataset.source(rows).shuffle(seed=seed)[: steps_per_epoch * global_batch_size]
        host_batches = epoch.batch(host_batch_size, batch_fn=list)[process_index::process_count]
        super().__init__(iter(host_batches.map(encode).repeat().to_iter_dataset(READ_OPTIONS)))
        self._order = {"rows": len(rows), "seed": seed, "global_batch_size": global_batch_size,
                       "num_negatives": num_negatives}

    def __next__(self) -> dict[str, dict[str, np.ndarray]]:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._parent.get_state(), "order": self._order}

    def set_state(self, state: dict[str, Any]) -> None:
        if state["order"] != self._order:
            raise UserError(f"the saved data iterator state was made with {state['order']}, this pipeline uses "
                             f"{self._order}; resume with the same data, seed, batch size and negatives")
        self._parent.set_state(state["grain"])
