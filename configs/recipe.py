"""The reference's recipes on each 7-8B model: --config=configs/recipe.py:MODEL,RECIPE

MODEL: dream-7b | qwen2.5-7b | llama3-8b | mistral-7b | llada-8b
RECIPE: long_documents | reasoning (alias theorem) | instruction_following | simcse
Set --config.model.path (converted or HF directory) and --config.data.files.

Values are the FINAL versions of the reference's train_configs (siyue-zhang/DiffEmbed at 3a49bbc9,
"public", 2025-06-29), run on 4 GPUs (its README: "We use 4 A6000 GPUs"; run.sh: torchrun
--nproc_per_node=4), so global batch = per_device_train_batch_size x 4 x gradient_accumulation_steps:

- long_documents: train_configs/supervised/{Dream,Qwen2,MetaLlama3,Mistral}_long.json
- reasoning: .../*_theorem.json (E5Mix with aug_file_path TheoremAug/TheoremAug.jsonl = ReasonAug;
  the reference's *_reason.json are another experiment, ReasonIR data, which this toolkit has no format for)
- instruction_following: .../*_if.json (RepllamaLoss with scale_by_dim, 15 negatives: MSMARCO.py
  train_n_passages=16)
- simcse: train_configs/simcse/{Dream,Qwen2,MetaLlama3,Mistral}.json
The reference's run_supervised.py: loss_scale default 50 (no supervised config sets it), LoRA alpha =
2 x lora_r, lora_dropout 0.05, HF's linear schedule unless lr_scheduler_type says otherwise; the run
stops at min(stop_after_n_steps, one epoch). llada-8b has no config in the reference: it takes Dream's.
"""

from diffemb_jax.errors import ConfigError
from diffemb_jax.training.config import base_config

DIFFUSION = ("dream-7b", "llada-8b")
MODELS = DIFFUSION + ("qwen2.5-7b", "llama3-8b", "mistral-7b")
GPUS = 4  # the reference's torchrun --nproc_per_node=4

# Per recipe: data format, query / doc max length, loss; per model (llada-8b: Dream's): lr, warm-up,
# (per-device batch, gradient accumulation), steps, LoRA rank.
RECIPES = {
    "long_documents": dict(format="echo", query_length=4096, doc_length=4096, loss="in_batch", scale=50.0, models={
        # Dream_long.json: stop_after_n_steps 4000 = one epoch of "Dream-e5-64k" (E5Data.py top=8000) at 16
        "dream-7b": dict(lr=5e-5, warmup=100, batch=(4, 1), steps=4000, rank=16),
        "qwen2.5-7b": dict(lr=1e-4, warmup=100, batch=(4, 1), steps=1000, rank=16),  # Qwen2_long.json
        "llama3-8b": dict(lr=5e-5, warmup=200, batch=(4, 1), steps=1000, rank=16),  # MetaLlama3_long.json
        "mistral-7b": dict(lr=1e-4, warmup=100, batch=(4, 1), steps=1000, rank=16),  # Mistral_long.json
    }),
    "reasoning": dict(format="reasonaug", query_length=4096, doc_length=4096, loss="in_batch", scale=50.0, models={
        # *_theorem.json: stop_after_n_steps 1000, but one epoch of ReasonAug's 10,896 rows at 16 is 681
        # steps, which ends the run first (the paper: 680)
        "dream-7b": dict(lr=1e-4, warmup=100, batch=(4, 1), steps=680, rank=16),
        "qwen2.5-7b": dict(lr=1e-4, warmup=100, batch=(4, 1), steps=680, rank=16),
        "llama3-8b": dict(lr=1e-4, warmup=100, batch=(4, 1), steps=680, rank=16),
        "mistral-7b": dict(lr=1e-4, warmup=100, batch=(4, 1), steps=680, rank=16),
    }),
    "instruction_following": dict(format="msmarco_instructions", query_length=304, doc_length=196, loss="per_query",
                                  scale=50.0, num_negatives=15, models={
        # *_if.json: 8 x 4 x 4 = 128; stop_after_n_steps 1000, but the epoch (16k rows) ends at 125
        # (run.sh evaluates checkpoint-125); max_seq_length 304 (queries), doc_max_length 196
        m: dict(lr=1e-4, warmup=20, batch=(8, 4), steps=125, rank=32)
        for m in ("dream-7b", "qwen2.5-7b", "llama3-8b", "mistral-7b")
    }),
    # Unsupervised SimCSE (llm2vec's step 2) on Wiki1M sentences as {"text": ...} rows; loss_scale 20; no
    # warm-up set (HF default 0). simcse_dropout 0.3 is the reference's attention dropout, which this
    # model does not have: the recipe puts it on the LoRA input instead (the two views' only difference).
    "simcse": dict(format="simcse", loss="in_batch", scale=20.0, num_negatives=0, lora_dropout=0.3, models={
        "dream-7b": dict(lr=3e-5, warmup=0, batch=(64, 1), steps=1000, rank=16, length=512),  # simcse/Dream.json
        "qwen2.5-7b": dict(lr=3e-5, warmup=0, batch=(32, 2), steps=2000, rank=16, length=128),  # simcse/Qwen2.json
        # simcse/{MetaLlama3,Mistral}.json are llm2vec's own (per device 128); its paper's batch is 128
        # (one device), and the DiffEmbed configs start from McGill-NLP's published SimCSE adapters
        "llama3-8b": dict(lr=3e-5, warmup=0, batch=(128, 1), steps=1000, rank=16, length=128, devices=1),
        "mistral-7b": dict(lr=3e-5, warmup=0, batch=(128, 1), steps=1000, rank=16, length=128, devices=1),
    }),
}
ALIASES = {"theorem": "reasoning"}  # the reference's file names: *_theorem.json

# MNTP (masked next-token prediction), llm2vec's step 1 for the autoregressive baselines, from
# train_configs/mntp/Qwen2.json (the one MNTP run DiffEmbed made; Llama-3 and Mistral use McGill-NLP's
# published -mntp adapters, made with train_configs/mntp/{MetaLlama3,Mistral}.json). For `diffemb adapt`.
MNTP = {
    "qwen2.5-7b": dict(
        data="wikitext-103-raw-v1", max_seq_length=512, mlm_probability=0.2, mask_token_type="blank",
        data_collator_type="default",  # plain random masking (not "all_mask")
        global_batch_size=16 * GPUS * 1, steps=4000,  # per device 16 x 4 GPUs x accumulation 1
        lr=5e-5, warmup_steps=0, schedule="linear",  # not set in the file: HF TrainingArguments' defaults
        lora_rank=16, lora_alpha=32, lora_dropout=0.05, attention="bidirectional",
    ),
}


def recipe_values(model: str, recipe: str) -> dict:
    """The recipe's settings for `model` (llada-8b: dream-7b's), with global_batch_size worked out."""
    r = RECIPES[ALIASES.get(recipe, recipe)]
    m = dict(r["models"]["dream-7b" if model == "llada-8b" else model])
    per_device, accumulation = m.pop("batch")
    m["global_batch_size"] = per_device * m.pop("devices", GPUS) * accumulation
    return {k: v for k, v in r.items() if k != "models"} | m


def get_config(arg: str = "dream-7b,long_documents"):
    model, _, recipe = arg.partition(",")
    if model not in MODELS or ALIASES.get(recipe, recipe) not in RECIPES:
        raise ConfigError(f"--config=configs/recipe.py:MODEL,RECIPE with MODEL in {MODELS} "
                         f"and RECIPE in {tuple(RECIPES) + tuple(ALIASES)}; got {arg!r}")
    r = recipe_values(model, recipe)
    c = base_config()
    # Every reference config says "bidirectional": true, also for the autoregressive models (llm2vec's
    # way, after MNTP for some); this recipe keeps them causal, the paper's comparison (README's table).
    c.model.attention = "bidirectional" if model in DIFFUSION else "causal"
    c.model.pooling = "mean"  # "pooling_mode": "mean" in every config
    c.data.format = r["format"]
    c.data.query_max_length = r.get("query_length", r.get("length"))
    c.data.doc_max_length = r.get("doc_length", r.get("length"))
    c.data.num_negatives = r.get("num_negatives", 1)
    c.loss.kind, c.loss.scale = r["loss"], r["scale"]
    c.lora.rank, c.lora.alpha = r["rank"], 2.0 * r["rank"]
    c.lora.dropout = r.get("lora_dropout", 0.05)
    c.train.update(lr=r["lr"], warmup_steps=r["warmup"], global_batch_size=r["global_batch_size"],
                   steps=r["steps"], schedule="linear")
    return c
