"""The training config: every key with its default, so a recipe file states only what differs and an
unknown `--config.x=y` override is an error naming the key (ml_collections' locked ConfigDict)."""

from __future__ import annotations

import ml_collections

from diffemb_jax.checkpoints.checkpoint import DTYPES
from diffemb_jax.embedding.pooling import POOLING_MODES
from diffemb_jax.errors import check_choice
from diffemb_jax.model import ATTENTION_MODES, REMAT_POLICIES
from diffemb_jax.model.attention import KERNELS
from diffemb_jax.model.lora import DEFAULT_TARGETS
from diffemb_jax.parallel import DISTRIBUTED_MODES
from diffemb_jax.training.loss import SCALE


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        path="",  # converted directory, HF model directory or .gguf file
        attention="bidirectional",  # bidirectional | causal
        kernel="auto",  # attention kernel: auto | xla | cudnn | splash
        dtype="bfloat16",  # base weights and activations; LoRA and optimizer state are float32
        pooling="mean",  # mean | weighted_mean | last_token
        skip_instruction=False,
        # the layers as one lax.scan: one layer compiled per step shape, not each (model/scan.py), for a
        # copy of the layers' weights while a step runs; off: the unrolled program, as before
        scan_layers=False,
    ))
    c.lora = ml_collections.ConfigDict(dict(
        rank=16, alpha=32.0, dropout=0.05,
        targets=DEFAULT_TARGETS,  # full-matched against a projection's path, e.g. layers/0/attn/q_proj
    ))
    c.data = ml_collections.ConfigDict(dict(
        files=(),  # JSONL training files; on the command line repeat --config.data.files=F
        format="echo",  # echo | reasonaug | msmarco_instructions | simcse (num_negatives=0)
        query_max_length=512,
        doc_max_length=512,
        num_negatives=1,
        pack=True,  # a step's texts several to a row (a few compiled row counts); False: one a row, one shape
        # packed rows are at least this long (a power of two): fewer lengths, so fewer programs to compile
        min_row_length=32,
        skip_bad_rows=False,
        cache_dir="",  # where the ArrayRecord dataset is built; default: WORKDIR/data
    ))
    c.loss = ml_collections.ConfigDict(dict(
        kind="in_batch",  # in_batch: cos * scale over all documents | per_query: dot / sqrt(d), own negatives
        scale=SCALE,
        # Matryoshka: the loss summed over the embeddings cut to each of these first dimensions (re-normalised
        # for the cosine loss), e.g. (64, 128, 256, 3584); () = off. Weights: one a dimension, () = all 1.
        matryoshka_dims=(),
        matryoshka_weights=(),
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the rest of the devices
    c.distributed = "auto"  # auto: JAX's cluster detection decides | on: a cluster is required | off: one process
    c.train = ml_collections.ConfigDict(dict(
        seed=42,
        steps=1000,
        global_batch_size=16,
        lr=1e-4,
        warmup_steps=100,
        schedule="linear",  # linear: warm-up then linear decay to 0 | constant: lr throughout, no warm-up (HF's)
        decay_steps=0,  # linear: the step where lr reaches 0; 0 = steps (HF decays over the whole epoch)
        grad_clip=1.0,
        weight_decay=0.0,
        remat="full",  # none | full | dots | dots_all (model/options.py REMAT_POLICIES)
        grad_cache_chunk=0,  # rows per chunk for gradient caching; 0 = off
        checkpoint_every=100,
        keep_checkpoints=3,
        log_every=1,
        profile_from=0,  # > 0: a jax.profiler trace of steps profile_from ... (+ profile_steps - 1) in WORKDIR/profile
        profile_steps=3,
    ))
    c.lock()
    return c


def adapt_config() -> ml_collections.ConfigDict:
    """`diffemb adapt`: continued pre-training with a masked-token objective (training/masked_lm.py)."""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        path="",  # converted directory, HF model directory or .gguf file
        attention="bidirectional",  # the point of adapting; causal only to compare
        kernel="auto",
        dtype="float32",  # base weights (trained in full-parameter mode) and activations
    ))
    c.objective = ml_collections.ConfigDict(dict(
        kind="diffusion",  # diffusion: t ~ U(eps, 1), loss weighted 1/t | mntp: fixed ratio, 80/10/10
        eps=1e-3,
        ratio=0.2,  # mntp's masking probability (llm2vec: mlm_probability 0.2)
        mask_token="<|mask|>",  # used when the model has no mask token: added to the vocabulary if missing
    ))
    c.lora = ml_collections.ConfigDict(dict(
        rank=0,  # 0: every parameter is trained (as Dream adapts Qwen2.5); > 0: LoRA of this rank
        alpha=32.0, dropout=0.05, targets=DEFAULT_TARGETS,
    ))
    c.data = ml_collections.ConfigDict(dict(
        files=(),  # JSONL with a "text" field, or .txt files (one document each); repeat --config.data.files=F
        length=512,  # tokens a row; longer documents are cut into pieces, shorter ones packed
        eval_files=(),  # held-out text, scored before the first step and after the last
        cache_dir="",  # where the token rows are stored; default: WORKDIR/data
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.distributed = "auto"  # as in base_config
    c.train = ml_collections.ConfigDict(dict(
        seed=42, steps=1000, global_batch_size=16, lr=5e-5, warmup_steps=50, grad_clip=1.0, weight_decay=0.0,
        remat="full", checkpoint_every=100, keep_checkpoints=3, log_every=1,
    ))
    c.lock()
    return c


def check_choices(config: ml_collections.ConfigDict) -> None:
    """Every field of a train or adapt config that takes one of a few values (the model's dtype,
    attention, kernel and pooling, the remat policy, ...), checked before any weight loads."""
    check_choice("config.model.dtype", config.model.dtype, DTYPES)
    check_choice("config.model.attention", config.model.attention, ATTENTION_MODES)
    check_choice("config.model.kernel", config.model.kernel, KERNELS)
    check_choice("config.train.remat", config.train.remat, REMAT_POLICIES)
    check_choice("config.distributed", config.distributed, DISTRIBUTED_MODES)
    if "pooling" in config.model:  # train; adapt pools nothing
        check_choice("config.model.pooling", config.model.pooling, POOLING_MODES)
