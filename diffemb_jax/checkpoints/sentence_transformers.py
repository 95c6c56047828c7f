"""sentence-transformers folders in and out, so a decoder-based model's pooling, prompts and length
travel with it and its vectors equal `SentenceTransformer(folder).encode`.

A folder is one by its `modules.json` (never its name): a Transformer module (the Hugging Face
directory, at the root or in a subfolder), a Pooling module (`1_Pooling/config.json`) and optionally
a Normalize module. `sentence_bert_config.json` holds the Transformer's settings (max_seq_length
in older versions; newer ones keep it as the tokenizer's model_max_length), and
`config_sentence_transformers.json` the prompts and the default prompt's name. What this project
cannot reproduce (a Dense projection, cls / max pooling, a chat template, lower-casing) is an error
naming the file and field. sentence-transformers runs a decoder as transformers does: causal
attention, right padding, no instruction format of its own (a prompt is put verbatim before the text).
This module reads and writes the JSON files only; the weights are the Hugging Face directory's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from diffemb_jax.checkpoints.sources import CheckpointError
from diffemb_jax.errors import ConfigError

MODULES_FILE = "modules.json"
TRANSFORMER_CONFIG = "sentence_bert_config.json"
MODEL_CONFIG = "config_sentence_transformers.json"
POOLING_DIR = "1_Pooling"
NORMALIZE_DIR = "2_Normalize"
# sentence-transformers' pooling mode -> this project's, for the modes both compute the same way
POOLING_FROM_ST = {"mean": "mean", "lasttoken": "last_token", "weightedmean": "weighted_mean"}
POOLING_TO_ST = {ours: theirs for theirs, ours in POOLING_FROM_ST.items()}
# pre-v5 Pooling configs: one boolean a mode
_LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
# sentence_bert_config.json: each field this project knows, and whether a value is one it reproduces
_TRANSFORMER_FIELDS = {
    "transformer_task": lambda v: v in (None, "feature-extraction"),  # others pool logits or scores
    "module_output_name": lambda v: v in (None, "token_embeddings"),
    "do_lower_case": lambda v: not v,
    "processing_kwargs": lambda v: not v,  # tokenizer / chat-template arguments
    "query_length": lambda v: v is None, "document_length": lambda v: v is None,  # multi-vector encoders
    "query_expansion": lambda v: v is None,
    "max_seq_length": lambda v: v is None or (isinstance(v, int) and v > 0),
    "modality_config": lambda v: v is None or (isinstance(v, dict) and set(v) == {"text"}
                                               and isinstance(v["text"], dict)
                                               and v["text"].get("method", "forward") == "forward"
                                               and v["text"].get("method_output_name") in (None, "last_hidden_state")),
    "unpad_inputs": lambda v: True,  # flash-attention unpadding: the same numbers
}


@dataclasses.dataclass(frozen=True)
class SentenceTransformersFolder:
    """What a sentence-transformers folder says about encoding, in this project's terms."""

    root: Path
    transformer: Path  # the Hugging Face directory of the decoder (config.json, weights, tokenizer)
    pooling: str  # mean | last_token | weighted_mean
    include_prompt: bool  # False: the prompt's tokens are not pooled (skip_instruction)
    normalize: bool  # a Normalize module follows the pooling
    max_seq_length: int | None
    prompts: dict[str, str]
    default_prompt_name: str | None

    def prompt(self, name: str | None = None) -> str:
        """The prompt `name` (default: the folder's default prompt, or none)."""
        name = self.default_prompt_name if name is None else name
        if name is None:
            return ""
        if name not in self.prompts:
            raise CheckpointError(f"{self.root / MODEL_CONFIG}: no prompt named {name!r} "
                                  f"(it has {', '.join(map(repr, self.prompts)) or 'none'})")
        return self.prompts[name]


def is_sentence_transformers(path: Path) -> bool:
    return path.is_dir() and (path / MODULES_FILE).is_file()


def _json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {what}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def _modules(root: Path) -> dict[str, Path]:
    """kind (Transformer, Pooling, Normalize) -> module folder, checked to be the chain this project runs."""
    entries = _json(root / MODULES_FILE, "a sentence-transformers folder lists its modules there")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("type"), str)
                                                for e in entries):
        raise CheckpointError(f"{root / MODULES_FILE}: expected a list of modules, each with a \"type\"")
    kinds = [e["type"].rsplit(".", 1)[-1] for e in entries]
    expected = ["Transformer", "Pooling"] + (["Normalize"] if kinds[2:3] == ["Normalize"] else [])
    if kinds != expected:
        odd = next((e["type"] for e, k in zip(entries, kinds) if k not in ("Transformer", "Pooling", "Normalize")),
                   None)
        what = (f"its module {odd} is not reproduced here (only Transformer, Pooling, Normalize are)" if odd
                else f"its modules are {kinds}; this project runs Transformer, Pooling[, Normalize] in that order")
        raise CheckpointError(f"{root / MODULES_FILE}: {what}; encode it with sentence-transformers itself")
    return {kind: root / e.get("path", "") for kind, e in zip(kinds, entries)}


def _pooling(folder: Path) -> tuple[str, bool]:
    path = folder / "config.json"
    config = _json(path, "the Pooling module's settings")
    mode = config.get("pooling_mode")
    if mode is None:  # the pre-v5 booleans
        modes = [m for key, m in _LEGACY_POOLING_KEYS.items() if config.get(key)]
        mode = modes[0] if len(modes) == 1 else modes
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if not isinstance(mode, str) or mode not in POOLING_FROM_ST:
        raise CheckpointError(f"{path}: pooling_mode {mode!r} is not reproduced here; supported: "
                              f"{', '.join(POOLING_FROM_ST)} (one of them)")
    include_prompt = config.get("include_prompt", True)
    if mode == "weightedmean" and not include_prompt:  # ST keeps the text's positions as weights; we count from 1
        raise CheckpointError(f"{path}: pooling_mode weightedmean with include_prompt false weighs tokens by "
                              "their position after the prompt, which this project does not; use mean or lasttoken")
    return POOLING_FROM_ST[mode], bool(include_prompt)


def _transformer_settings(folder: Path) -> int | None:
    """max_seq_length, after checking that sentence_bert_config.json asks for nothing this project lacks."""
    path = folder / TRANSFORMER_CONFIG
    config = _json(path, "the Transformer module's settings") if path.exists() else {}
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    for key, value in config.items():
        if key not in _TRANSFORMER_FIELDS:
            raise CheckpointError(f"{path}: field {key!r} is not known here; encode with sentence-transformers itself")
        if not _TRANSFORMER_FIELDS[key](value):
            hint = (" (a \"message\" entry applies the tokenizer's chat template, which this project does not)"
                    if key == "modality_config" else "")
            raise CheckpointError(f"{path}: {key} {value!r} is not reproduced here{hint}; "
                                  "encode with sentence-transformers itself")
    length = config.get("max_seq_length")
    if length is None:
        length = _tokenizer_max_length(folder)
    return length


def _tokenizer_max_length(folder: Path) -> int | None:
    """sentence-transformers' length when sentence_bert_config.json gives none: the tokenizer's
    model_max_length, capped at config.json's max_position_embeddings."""
    path = folder / "tokenizer_config.json"
    length = _json(path, "").get("model_max_length") if path.exists() else None
    if not isinstance(length, int) or length > 2**31:  # transformers' "no limit" is 1e30
        length = None
    config = folder / "config.json"
    positions = _json(config, "").get("max_position_embeddings") if config.exists() else None
    if isinstance(positions, int) and positions > 0:
        length = positions if length is None else min(length, positions)
    return length


def _prompts(root: Path) -> tuple[dict[str, str], str | None]:
    path = root / MODEL_CONFIG
    config = _json(path, "") if path.exists() else {}
    prompts = config.get("prompts") or {}
    default = config.get("default_prompt_name")
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise CheckpointError(f"{path}: prompts must map names to prompt strings")
    if default is not None and default not in prompts:
        raise CheckpointError(f"{path}: default_prompt_name {default!r} is not among its prompts "
                              f"({', '.join(map(repr, prompts)) or 'none'})")
    return prompts, default


def read_folder(root: str | Path) -> SentenceTransformersFolder:
    """Everything a sentence-transformers folder says, checked: an unsupported part raises CheckpointError."""
    root = Path(root)
    modules = _modules(root)
    pooling, include_prompt = _pooling(modules["Pooling"])
    prompts, default = _prompts(root)
    return SentenceTransformersFolder(root=root, transformer=modules["Transformer"], pooling=pooling,
                                      include_prompt=include_prompt, normalize="Normalize" in modules,
                                      max_seq_length=_transformer_settings(modules["Transformer"]),
                                      prompts=prompts, default_prompt_name=default)


def write_modules(directory: Path, *, hidden_size: int, pooling: str, include_prompt: bool, max_seq_length: int,
                  prompts: dict[str, str] | None = None, default_prompt_name: str | None = None,
                  pad_token: str) -> None:
    """Make the Hugging Face directory `directory` a sentence-transformers folder: Transformer at the root,
    Pooling, Normalize (this project's vectors are always L2-normalised), prompts, and a
    tokenizer_config.json that loads tokenizer.json as it is, right-padded with `pad_token`."""
    if pooling not in POOLING_TO_ST:
        raise ConfigError(f"pooling {pooling!r} has no sentence-transformers equal; "
                         f"choose one of {tuple(POOLING_TO_ST)}")
    if pooling == "weighted_mean" and not include_prompt:
        raise ConfigError("weighted_mean without the prompt pooled has no sentence-transformers equal")
    prompts = dict(prompts or {})
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise ConfigError(f"default prompt {default_prompt_name!r} is not among the prompts {sorted(prompts)}")
    write = lambda path, value: path.write_text(json.dumps(value, indent=2) + "\n")  # noqa: E731
    write(directory / MODULES_FILE, [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": NORMALIZE_DIR, "type": "sentence_transformers.models.Normalize"}])
    write(directory / TRANSFORMER_CONFIG, {"max_seq_length": max_seq_length, "do_lower_case": False})
    write(directory / MODEL_CONFIG, {"prompts": prompts, "default_prompt_name": default_prompt_name,
                                      "similarity_fn_name": "cosine", "model_type": "SentenceTransformer"})
    (directory / POOLING_DIR).mkdir()
    write(directory / POOLING_DIR / "config.json", {"embedding_dimension": hidden_size,
                                                    "pooling_mode": POOLING_TO_ST[pooling],
                                                    "include_prompt": include_prompt})
    (directory / NORMALIZE_DIR).mkdir()
    write(directory / NORMALIZE_DIR / "config.json", {})
    # TokenizersBackend: tokenizer.json as written (a model type's own tokenizer class would rebuild it)
    write(directory / "tokenizer_config.json", {"tokenizer_class": "TokenizersBackend", "pad_token": pad_token,
                                                "padding_side": "right", "model_max_length": max_seq_length})


def model_card(model_type: str, dtype: str, *, pooling: str, include_prompt: bool, max_seq_length: int,
               prompts: dict[str, str], default_prompt_name: str | None) -> str:
    """The README.md of a sentence-transformers export: how to load it and what it reproduces."""
    prompt_lines = [f"- `{name}`: {text!r}" + (" (the default)" if name == default_prompt_name else "")
                    for name, text in prompts.items()] or ["- none"]
    return "\n".join([
        f"# {model_type} embedder exported by diffemb-jax (sentence-transformers)", "",
        "A sentence-transformers folder: the Hugging Face decoder at the root (config.json, safetensors, "
        "tokenizer.json), then Pooling and Normalize modules.", "",
        "    from sentence_transformers import SentenceTransformer",
        "    model = SentenceTransformer(THIS_FOLDER)",
        "    vectors = model.encode(texts)", "",
        f"Pooling: {POOLING_TO_ST[pooling]} (prompt tokens {'' if include_prompt else 'not '}pooled), "
        f"L2-normalised; at most {max_seq_length} tokens a text. Prompts (put verbatim before the text):",
        *prompt_lines, "",
        "**Attention is causal.** sentence-transformers runs a decoder as transformers does, each token "
        "attending to those before it. The vectors equal `diffemb encode --model THIS_FOLDER` (which reads "
        f"these settings: `--attention causal --pooling {pooling}`). A model trained or adapted with "
        "bidirectional attention (diffemb train's default; Dream, LLaDA) gives different, usually worse, "
        "vectors here: diffemb-jax refuses to write this folder unless told the model is used causally "
        "(`diffemb export --format sentence-transformers --attention causal`).", ""])
