"""Token ids laid into the int32 arrays a compiled program takes: rows of one length, padded to a row count.

Each token carries its text's number in its row (`segment_ids`, from 1; 0 for pads), which the
attention mask keeps texts apart by and pooling pools by, and whether it is embedded (`embed_mask`:
the last embed_lengths[i] tokens of text i, so pooling can skip the instruction).
"""

from __future__ import annotations

import numpy as np


def pack_batch(ids: list[list[int]], embed_lengths: list[int], rows: list[list[int]], length: int, padded_rows: int):
    """Texts packed one after another into `padded_rows` rows of `length` tokens, row r holding the
    texts numbered rows[r]: (input_ids, segment_ids, embed_mask) as int32 numpy arrays, segment_ids
    being each token's place in its row's list, from 1 (0 for pads)."""
    input_ids = np.zeros((padded_rows, length), np.int32)
    segment_ids = np.zeros((padded_rows, length), np.int32)
    embed_mask = np.zeros((padded_rows, length), np.int32)
    for r, texts in enumerate(rows):
        start = 0
        for k, i in enumerate(texts, 1):
            end = start + len(ids[i])
            if end > length:
                raise ValueError(f"row {r} holds {end} tokens, more than its {length}")
            input_ids[r, start:end] = ids[i]
            segment_ids[r, start:end] = k
            embed_mask[r, end - embed_lengths[i] : end] = 1
            start = end
    return input_ids, segment_ids, embed_mask


def pad_batch(ids: list[list[int]], embed_lengths: list[int], length: int, rows: int):
    """Right-pad to [rows, length]: (input_ids, padding_mask, embed_mask) as int32 numpy arrays
    (pack_batch with one text a row, whose segment ids are the padding mask)."""
    return pack_batch(ids, embed_lengths, [[i] for i in range(len(ids))], length, rows)


def pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """`batch` with empty rows (all pads) appended up to `rows`."""
    extra = rows - len(batch["input_ids"])
    if extra < 0:
        raise ValueError(f"the batch has {len(batch['input_ids'])} rows, more than {rows}")
    return {key: np.pad(value, ((0, extra), (0, 0))) for key, value in batch.items()}
