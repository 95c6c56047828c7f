"""The training config: every key with its default, so a recipe file states only what differs and an
unknown `--config.x=y` override is an error naming the key (ml_collections' locked ConfigDict)."""

from __future__ import annotations

import ml_collections

from diffemb_jax.model.lora import DEFAULT_TARGETS
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
    ))
    c.lora = ml_collections.ConfigDict(dict(
        rank=16, alpha=32.0, dropout=0.05,
        targets=DEFAULT_TARGETS,  # full-matched against a projection's path, e.g. layers/0/attn/q_proj
    ))
    c.data = ml_collections.ConfigDict(dict(
        files=(),  # JSONL training files; on the command line repeat --config.data.files=F
        format="echo",  # echo | reasonaug | msmarco_instructions
        query_max_length=512,
        doc_max_length=512,
        num_negatives=1,
        pack=True,  # a step's texts several to a row (a few compiled row counts); False: one a row, one shape
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
    c.train = ml_collections.ConfigDict(dict(
        seed=42,
        steps=1000,
        global_batch_size=16,
        lr=1e-4,
        warmup_steps=100,
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
