"""A request's inputs into token ids, exactly as Embedder.encode tokenises them (the project's prompt
format, or the Embedder's sentence-transformers prompt; prompts.py), with over-long inputs refused
(400, code context_length_exceeded) or cut at max_length when the request says truncate."""

from __future__ import annotations

import sys

from diffemb_jax.embedding.prompts import tokenize, tokenize_with_prompt, with_instruction
from diffemb_jax.serve.errors import invalid
from diffemb_jax.serve.schemas import EmbedRequest


def request_tokens(tokenizer, request: EmbedRequest, max_length: int, field: str,
                   prompt: str | None = None) -> tuple[list, list]:
    """(ids, embed_lengths) of each input, each 1..max_length ids; `prompt`: the Embedder's
    sentence-transformers prompt, for inputs without an instruction."""
    prompted = request.token_ids is None and request.instruction is None and prompt is not None
    if request.token_ids is not None:
        ids = [list(row) for row in request.token_ids]
        embed_lengths = [len(row) for row in ids]
    else:
        tokens = (tokenize_with_prompt(tokenizer, request.texts, prompt, sys.maxsize) if prompted else
                  tokenize(tokenizer, [with_instruction(t, request.instruction) for t in request.texts], sys.maxsize))
        ids, embed_lengths = tokens.ids, tokens.embed_lengths
        empty = [i for i, row in enumerate(ids) if not row]
        if empty:
            raise invalid(f"'{field}' item {empty[0]} gives no tokens at all", field)
    long = [i for i, row in enumerate(ids) if len(row) > max_length]
    if long and not request.truncate:
        i = long[0]
        raise invalid(f"'{field}' item {i} has {len(ids[i])} tokens; this model takes at most {max_length}. "
                      "Shorten it, or send \"truncate\": true to cut it", field, "context_length_exceeded")
    for i in long:  # as tokenize(..., max_length) cuts: the first max_length ids
        cut, ids[i] = len(ids[i]) - max_length, ids[i][:max_length]
        embed_lengths[i] = max(embed_lengths[i] - cut, 0) if prompted else min(embed_lengths[i], max_length)
    return ids, embed_lengths
