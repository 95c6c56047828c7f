"""A train step's texts packed into rows: the one layout the train step takes.

The data pipeline gives each host its share of the global batch side by side (queries, positives,
negatives, each right-padded to its max length). `pack_step` lays all of them into rows as long as
the bucket (powers of two, and the longer max length) of the step's longest text, several to a row
by first fit decreasing, so a step computes its real tokens and next to no padding, and attention
(whose cost per token grows with the row) no more than the texts need: the recipe's short queries
no longer fill rows of 4096 tokens. `pack=False` puts one text a row, rows of the longer max length.

Each token carries its text's number, which the attention mask keeps texts apart by and pooling
sums by. Numbers run across the global batch, side by side: with G queries and k negatives
each, query g is g + 1, its positive G + g + 1, its j-th negative 2G + g*k + j + 1, whichever host
holds them, so the step finds every embedding at a fixed place however the rows were packed.

Row counts vary with the texts; the caller pads them to padded_rows (rows.py) with pad_rows
(arrays.py), so the step compiles a few programs at most (one a row count and length met), and
every host takes the same length and pads to the same count. Where that count leaves a row for
every text, packing saves nothing and the texts go one a row (`packs`): one text a row, cuDNN takes
each row's length. Packed, it takes each row's texts as a list whose size is a program's constant:
`texts_per_row` rounds the step's most texts a row up to a power of two, so that a few programs serve.
"""

from __future__ import annotations

import numpy as np

from diffemb_jax.batching.arrays import pack_batch
from diffemb_jax.batching.layout import bucket_lengths, pack_rows
from diffemb_jax.batching.rows import padded_rows

SIDES = ("query", "positive", "negative")  # the data pipeline's, in text-number order
STEP_KEYS = ("input_ids", "segments", "embed_mask")  # the step's batch, each [rows, length] int32
SHORTEST_ROW = 32  # the shortest bucket a packed step's rows take (the config's data.min_row_length)


def text_numbers(global_batch_size: int, num_negatives: int, process_index: int, host_batch_size: int) -> np.ndarray:
    """The numbers of this host's texts, in its side-by-side order (queries, positives, negatives)."""
    g = process_index * host_batch_size + np.arange(host_batch_size)
    negatives = (2 * global_batch_size + g[:, None] * num_negatives + np.arange(num_negatives)).reshape(-1)
    return np.concatenate([g, global_batch_size + g, negatives]) + 1


def _texts(sides: dict) -> tuple[list[list[int]], list[int]]:
    """Each text's token ids and embedded token count, in text-number order."""
    ids, embed_lengths = [], []
    for side in SIDES:
        for row, real, embed in zip(sides[side]["input_ids"], sides[side]["padding_mask"], sides[side]["embed_mask"]):
            ids.append(row[real > 0].tolist())
            embed_lengths.append(int(embed.sum()))
    return ids, embed_lengths


def packs(rows: int, texts: int) -> bool:
    """Whether a step's `texts`, packed into `rows` rows (padded, rows.py), stay several to a row:
    only when the rows are fewer than the texts. With a row for each, one text a row computes the
    same tokens and spares the attention kernel the texts' mask."""
    return rows < texts


def texts_per_row(segments: np.ndarray) -> int:
    """The most texts a row of a packed step's [rows, length] segment ids holds, rounded up to a power
    of two (at least 2)."""
    starts = (segments != np.pad(segments[:, :-1], ((0, 0), (1, 0)))) & (segments > 0)
    most = int(starts.sum(axis=1).max(initial=0))
    return max(2, 1 << max(most - 1, 0).bit_length())


def row_length(sides: dict, pack: bool = True, shortest: int = SHORTEST_ROW) -> int:
    """The length of a step's rows: packed, the bucket (from `shortest` up) of its longest text; else the
    longer max length."""
    longest_allowed = max(sides[side]["input_ids"].shape[1] for side in SIDES)
    if not pack:
        return longest_allowed
    longest = max(int(sides[side]["padding_mask"].sum(1).max()) for side in SIDES if len(sides[side]["input_ids"]))
    return next(b for b in bucket_lengths(longest_allowed, shortest) if b >= longest)


def step_shapes(max_length: int, most_rows: int, multiple: int = 1, pack: bool = True,
                shortest: int = SHORTEST_ROW) -> list[tuple[int, int]]:
    """Every (rows, length) a host's step can take, so every program a run can compile: packed, a bucket
    of max_length (the longer side's; `shortest` the first) by a padded_rows count of 1 ... most_rows
    (one text a row), each pair reachable (texts can fill any number of rows of their bucket, one text
    a row at most); one text a row, just one. A longer `shortest` is the cap: fewer lengths."""
    if not pack:
        return [(padded_rows(most_rows, multiple, most_rows), max_length)]
    rows = sorted({padded_rows(n, multiple, most_rows) for n in range(1, most_rows + 1)})
    return [(r, length) for length in bucket_lengths(max_length, shortest) for r in rows]


def pack_step(sides: dict, *, global_batch_size: int, num_negatives: int, process_index: int = 0,
              pack: bool = True, length: int | None = None) -> dict[str, np.ndarray]:
    """This host's {"query", "positive", "negative"} padded arrays -> {"input_ids", "segments",
    "embed_mask"} [rows, length] int32, segments holding global text numbers (0 for pads). `length`:
    the rows' (every host's row_length, the longest of them), by default this host's row_length."""
    host_batch_size = len(sides["query"]["input_ids"])
    length = row_length(sides, pack) if length is None else length
    ids, embed_lengths = _texts(sides)
    rows = pack_rows([len(t) for t in ids], length) if pack else [[i] for i in range(len(ids))]
    input_ids, place, embed_mask = pack_batch(ids, embed_lengths, rows, length, len(rows))
    numbers = text_numbers(global_batch_size, num_negatives, process_index, host_batch_size)
    table = np.zeros((len(rows), max(map(len, rows)) + 1), np.int32)  # row r, place k -> text number
    for r, texts in enumerate(rows):
        table[r, 1 : len(texts) + 1] = numbers[texts]
    return dict(zip(STEP_KEYS, (input_ids, np.take_along_axis(table, place, axis=1), embed_mask)))
