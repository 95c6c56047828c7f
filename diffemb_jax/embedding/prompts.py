"""Prompt format of the reference recipe and its tokenisation into a batch with an embed mask.

Query: "{instruction}; " + SEPARATOR + text; document: SEPARATOR + text. The separator is removed
before tokenising; the tokens of the part after it form `embed_mask`, counted as llm2vec counts them
(the tail tokenised alone, marked from the end of the sequence), so pooling can skip the instruction.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tokenizers

SEPARATOR = "!@#$%^&*()"


def with_instruction(text: str, instruction: str | None) -> str:
    return f"{instruction}; {SEPARATOR}{text}" if instruction else f"{SEPARATOR}{text}"


@dataclasses.dataclass
class Tokenized:
    """Token ids of each text (unpadded) and how many trailing tokens are embedded."""

    ids: list[list[int]]
    embed_lengths: list[int]
    truncated: int  # how many texts were cut at max_length


def tokenize(tokenizer: tokenizers.Tokenizer, texts: list[str], max_length: int) -> Tokenized:
    heads_tails = [t.split(SEPARATOR, 1) if SEPARATOR in t else ["", t] for t in texts]
    full = tokenizer.encode_batch([h + t for h, t in heads_tails])
    tails = tokenizer.encode_batch([t for _, t in heads_tails], add_special_tokens=False)
    ids, embed_lengths, truncated = [], [], 0
    for enc, tail in zip(full, tails):
        row = enc.ids
        if len(row) > max_length:
            row, truncated = row[:max_length], truncated + 1
        ids.append(row)
        embed_lengths.append(min(len(tail.ids), len(row)))
    return Tokenized(ids, embed_lengths, truncated)


def pad_batch(ids: list[list[int]], embed_lengths: list[int], length: int, rows: int):
    """Right-pad to [rows, length]: (input_ids, padding_mask, embed_mask) as int32 numpy arrays
    (pack_batch with one text a row, whose segments are the padding mask)."""
    return pack_batch(ids, embed_lengths, [[i] for i in range(len(ids))], length, rows)


def pack_batch(ids: list[list[int]], embed_lengths: list[int], rows: list[list[int]], length: int, padded_rows: int):
    """Texts packed one after another into `padded_rows` rows of `length` tokens, row r holding the
    texts numbered rows[r]: (input_ids, segments, embed_mask) as int32 numpy arrays, segments being
    each token's place in its row's list, from 1 (0 for pads)."""
    input_ids = np.zeros((padded_rows, length), np.int32)
    segments = np.zeros((padded_rows, length), np.int32)
    embed_mask = np.zeros((padded_rows, length), np.int32)
    for r, texts in enumerate(rows):
        start = 0
        for k, i in enumerate(texts, 1):
            end = start + len(ids[i])
            if end > length:
                raise ValueError(f"row {r} holds {end} tokens, more than its {length}")
            input_ids[r, start:end] = ids[i]
            segments[r, start:end] = k
            embed_mask[r, end - embed_lengths[i] : end] = 1
            start = end
    return input_ids, segments, embed_mask
