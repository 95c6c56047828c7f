"""What a request asks for, read and checked: OpenAI's /v1/embeddings body and TEI's /embed body both
become one EmbedRequest (the inputs as texts or token-id lists, the prompt, the output options).

Checks, each a 400 in OpenAI's error shape (errors.py) naming the field: the body is a JSON object;
`input`/`inputs` is a non-empty string, a non-empty list of non-empty strings, a non-empty list of
token ids, or a non-empty list of such lists (ids in 0..vocab-1), at most `max_inputs` of them;
`encoding_format` is float or base64; `dimensions` is 1..width; TEI's `normalize` is true or false
(false: the pooled vectors as they are, not L2-normalised); `instruction` and `prompt_name`
are strings (a prompt name the server was started with); token ids take no instruction (the ids are
the whole sequence, embedded whole). Over-long inputs are checked once tokenised (tokens.py).
"""

from __future__ import annotations

import dataclasses

from diffemb_jax.serve.errors import invalid


@dataclasses.dataclass
class EmbedRequest:
    texts: list[str] | None  # or
    token_ids: list[list[int]] | None
    instruction: str | None = None
    truncate: bool = False
    dimensions: int | None = None
    encoding_format: str = "float"
    model: str | None = None
    normalize: bool = True  # False (TEI's normalize=false): the pooled vectors, not made unit length

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids)


@dataclasses.dataclass(frozen=True)
class Limits:
    max_inputs: int
    vocab_size: int
    width: int  # the embedding's components
    prompts: dict[str, str]  # TEI prompt names -> instructions


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _inputs(value, field: str, limits: Limits) -> tuple[list[str] | None, list[list[int]] | None]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise invalid(f"'{field}' must be a string, a list of strings, a list of token ids or a list of "
                      f"such lists; got {type(value).__name__}", field)
    if not value:
        raise invalid(f"'{field}' is an empty list: give at least one input", field)
    if all(_is_int(x) for x in value):  # one token-id list
        value = [value]
    if len(value) > limits.max_inputs:
        raise invalid(f"'{field}' has {len(value)} inputs; this server takes at most {limits.max_inputs} a "
                      "request: send fewer", field, "too_many_inputs")
    if all(isinstance(x, str) for x in value):
        empty = [i for i, x in enumerate(value) if not x.strip()]
        if empty:
            raise invalid(f"'{field}' item {empty[0]} is an empty string: every input needs text", field)
        return value, None
    if all(isinstance(x, list) for x in value):
        for i, ids in enumerate(value):
            if not ids:
                raise invalid(f"'{field}' item {i} is an empty token list", field)
            bad = next((x for x in ids if not _is_int(x) or not 0 <= x < limits.vocab_size), None)
            if bad is not None:
                raise invalid(f"'{field}' item {i}: {bad!r} is not a token id (integers 0 to "
                              f"{limits.vocab_size - 1})", field)
        return None, value
    bad = next(i for i, x in enumerate(value) if not isinstance(x, str))
    raise invalid(f"'{field}' item {bad} is {type(value[bad]).__name__}: items must all be strings, or all "
                  "token-id lists", field)


def _optional(body: dict, key: str, kind, what: str):
    value = body.get(key)
    if value is not None and not (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        raise invalid(f"'{key}' must be {what}", key)
    return value


def _prompt(body: dict, limits: Limits) -> str | None:
    instruction = _optional(body, "instruction", str, "a string")
    name = _optional(body, "prompt_name", str, "a string")
    if name is not None:
        if instruction is not None:
            raise invalid("give 'instruction' or 'prompt_name', not both", "prompt_name")
        if name not in limits.prompts:
            known = ", ".join(sorted(limits.prompts)) or "none (start the server with --prompt NAME=INSTRUCTION)"
            raise invalid(f"unknown prompt_name {name!r}; known: {known}", "prompt_name")
        instruction = limits.prompts[name]
    return instruction or None


def _request(body, field: str, limits: Limits) -> EmbedRequest:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    if field not in body:
        raise invalid(f"'{field}' is required", field)
    texts, token_ids = _inputs(body[field], field, limits)
    instruction = _prompt(body, limits)
    if token_ids is not None and instruction is not None:
        raise invalid("token-id inputs take no instruction or prompt_name: the ids are embedded as they are",
                      "instruction")
    truncate = _optional(body, "truncate", bool, "true or false")
    return EmbedRequest(texts, token_ids, instruction, bool(truncate))


def openai_request(body, limits: Limits) -> EmbedRequest:
    """POST /v1/embeddings: input, model, encoding_format, dimensions, user; instruction and truncate
    are this server's additions."""
    request = _request(body, "input", limits)
    request.model = _optional(body, "model", str, "a string")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise invalid(f"'encoding_format' must be 'float' or 'base64', got {fmt!r}", "encoding_format")
    request.encoding_format = fmt or "float"
    dims = _optional(body, "dimensions", int, "an integer")
    if dims is not None and not 1 <= dims <= limits.width:
        raise invalid(f"'dimensions' {dims}: this model's embeddings have {limits.width} components; give 1 to "
                      f"{limits.width}", "dimensions")
    request.dimensions = dims
    return request


def tei_request(body, limits: Limits) -> EmbedRequest:
    """POST /embed: inputs, normalize, truncate, prompt_name (and instruction)."""
    request = _request(body, "inputs", limits)
    request.normalize = _optional(body, "normalize", bool, "true or false") is not False
    dims = _optional(body, "dimensions", int, "an integer")
    if dims is not None and not 1 <= dims <= limits.width:
        raise invalid(f"'dimensions' {dims}: give 1 to {limits.width}", "dimensions")
    request.dimensions = dims
    return request
