"""What the bench runs on: a checkpoint (--model, by default the bundled SmolLM2), or a named model
shape (--shape) at random weights, seeded, written once to the cache and reused, with a tokenizer
whose ids fit it; and for the PyTorch side, the weights transformers can load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import tokenizers

from diffemb_jax import assets, atomic
from diffemb_jax.cache import cache_dir
from diffemb_jax.checkpoints import is_converted
from diffemb_jax.checkpoints.bundled import converted_smollm2
from diffemb_jax.checkpoints.checkpoint import CONVERTED_MARKER, hf_tokenizer
from diffemb_jax.errors import MissingPathError, UserError

_7B_QWEN2 = ("qwen2", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                           intermediate_size=18944, vocab_size=152064, rope_theta=1e6, rms_norm_eps=1e-6))
# --shape: (transformers model type, config) of models benched at random weights. Dream and LLaDA
# compute as the Qwen2 and LLaMA of their shape (the bench runs bidirectional attention on all).
SHAPES = {
    "tiny": ("llama", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=49152, tie_word_embeddings=True)),
    "smollm2-135m": ("llama", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                   intermediate_size=1536, vocab_size=49152, rope_theta=1e5, rms_norm_eps=1e-5,
                                   tie_word_embeddings=True)),
    "dream-7b": _7B_QWEN2,
    "qwen2.5-7b": _7B_QWEN2,
    "llama3-8b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                intermediate_size=14336, vocab_size=128256, rope_theta=5e5, rms_norm_eps=1e-5)),
    "llada-8b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                               intermediate_size=12288, vocab_size=126464, rope_theta=5e5, rms_norm_eps=1e-5)),
}


LONGEST = 32768  # the longest LongEmbed context: what the named shapes must read
DEFAULT_SHAPE = "smollm2-135m"  # the bundled model's
SEED = 42  # of the random weights


def tokenizer_for(model: Path):
    """The tokenizer that load_model gives the Embedder, without reading any weights."""
    return hf_tokenizer(model.parent, model.name) if model.suffix == ".gguf" else hf_tokenizer(model)


def torch_source(model: Path) -> Path:
    """The weights transformers can load: the model itself, or what a converted directory came from."""
    if not is_converted(model):
        return model
    source = json.loads((model / CONVERTED_MARKER).read_text()).get("source", "")
    if not source or not Path(source).exists():
        raise MissingPathError(f"{model} was converted from {source!r}, which is gone; the PyTorch reference "
                                "needs those original weights: pass the HF directory or .gguf as --model")
    return Path(source)


def shape_tokenizer(path: str | Path | None, shape: str):
    """The tokenizer of a --shape run: --tokenizer (a tokenizer.json, a model directory or a .gguf),
    by default the bundled SmolLM2's; its ids must fit the shape's vocabulary."""
    path = Path(path) if path is not None else assets.smollm2_gguf()
    if not path.exists():
        raise MissingPathError(f"--tokenizer {path} does not exist")
    tokenizer = tokenizers.Tokenizer.from_file(str(path)) if path.suffix == ".json" else tokenizer_for(path)
    vocab = SHAPES[shape][1]["vocab_size"]
    if tokenizer.get_vocab_size() > vocab:
        raise UserError(f"the tokenizer {path} has {tokenizer.get_vocab_size()} ids, more than the "
                         f"{vocab} of shape {shape}: pass a --tokenizer whose ids fit")
    return tokenizer


def random_weights(shape: str, dtype: str) -> Path:
    """The transformers checkpoint (config and weights) of a named shape at random weights, seeded:
    written once to the cache and reused, since a 7B shape is 15 GB and minutes to write. Written
    beside its place and renamed into it when complete, so a cached one is never half-written."""
    # Imported here: torch (an optional dependency) writes the weights, and only for --shape.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, fields = SHAPES[shape]
    recipe = json.dumps([model_type, fields, LONGEST, SEED, dtype], sort_keys=True)
    out = cache_dir() / "bench" / f"{shape}-{dtype}-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"writing random weights of shape {shape} ({dtype}) to {out}", flush=True)

    def fill(partial: Path) -> None:
        torch.manual_seed(SEED)
        config = AutoConfig.for_model(model_type, max_position_embeddings=LONGEST, **fields)
        AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).save_pretrained(partial)

    return atomic.write_directory(out, fill, another_may_win=True)  # another process may cache it first


def random_checkpoint(shape: str, directory: Path, dtype: str, tokenizer) -> Path:
    """A checkpoint directory of a named shape at random weights (links to random_weights' files) and
    `tokenizer`. Both frameworks then load it as --model."""
    directory.mkdir(parents=True)
    for file in random_weights(shape, dtype).iterdir():
        (directory / file.name).symlink_to(file)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def bench_model(args, tmp: Path) -> Path:
    """The checkpoint a bench runs: --shape's random weights (linked into `tmp`), --model, or the
    bundled SmolLM2 converted."""
    if args.shape:
        model = random_checkpoint(args.shape, tmp / args.shape, args.dtype, shape_tokenizer(args.tokenizer, args.shape))
    else:
        model = Path(args.model) if args.model else converted_smollm2()
    if not model.exists():
        raise MissingPathError(f"{model} does not exist")
    return model
