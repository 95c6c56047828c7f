"""Prompt formats (the reference recipe's, sentence-transformers') and their tokenisation, with how many
tokens are embedded.

Query: "{instruction}; " + SEPARATOR + text; document: SEPARATOR + text. The separator is removed
before tokenising; the tokens of the part after it form `embed_mask`, counted as llm2vec counts them
(the tail tokenised alone, marked from the end of the sequence), so pooling can skip the instruction;
batching/arrays.py lays them into arrays.
"""

from __future__ import annotations

import dataclasses

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


def tokenize_with_prompt(tokenizer: tokenizers.Tokenizer, texts: list[str], prompt: str, max_length: int) -> Tokenized:
    """sentence-transformers' prompts: `prompt + text` tokenised whole, cut at max_length; the tokens
    after the prompt's own count form the embed mask, counted as sentence-transformers counts them
    (the prompt tokenised alone with special tokens, less a trailing special token; no prompt, none),
    so skip_instruction pools what its include_prompt=False pools."""
    rows = [enc.ids for enc in tokenizer.encode_batch([prompt + t for t in texts])]
    prompt_length = 0
    if prompt:
        prompt_ids = tokenizer.encode(prompt).ids
        special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
        prompt_length = len(prompt_ids) - (1 if prompt_ids and prompt_ids[-1] in special else 0)
    truncated = sum(len(row) > max_length for row in rows)
    rows = [row[:max_length] for row in rows]
    return Tokenized(rows, [max(len(row) - prompt_length, 0) for row in rows], truncated)
