"""The paper's three recipes on each 7-8B model: --config=configs/recipe.py:MODEL,RECIPE

MODEL: dream-7b | qwen2.5-7b | llama3-8b | mistral-7b | llada-8b
RECIPE: long_documents | reasoning | instruction_following
Set --config.model.path (converted or HF directory) and --config.data.files.
"""

from diffemb_jax.training.config import base_config

DIFFUSION = ("dream-7b", "llada-8b")
MODELS = DIFFUSION + ("qwen2.5-7b", "llama3-8b", "mistral-7b")
RECIPES = {
    # data format, lr (diffusion, autoregressive), warm-up, global batch, max length, steps
    "long_documents": dict(format="echo", lr=(5e-5, 1e-4), warmup=100, batch=16, length=4096, steps=1000),
    "reasoning": dict(format="reasonaug", lr=(1e-4, 1e-4), warmup=100, batch=16, length=4096, steps=680),
    "instruction_following": dict(format="msmarco_instructions", lr=(1e-4, 1e-4), warmup=20, batch=128,
                                  length=304, steps=125),
}


def get_config(arg: str = "dream-7b,long_documents"):
    model, _, recipe = arg.partition(",")
    if model not in MODELS or recipe not in RECIPES:
        raise ValueError(f"--config=configs/recipe.py:MODEL,RECIPE with MODEL in {MODELS} "
                         f"and RECIPE in {tuple(RECIPES)}; got {arg!r}")
    r = RECIPES[recipe]
    c = base_config()
    c.model.attention = "bidirectional" if model in DIFFUSION else "causal"
    c.data.format = r["format"]
    c.data.query_max_length = c.data.doc_max_length = r["length"]
    c.train.lr = r["lr"][0] if model in DIFFUSION else r["lr"][1]
    c.train.update(warmup_steps=r["warmup"], global_batch_size=r["batch"], steps=r["steps"])
    if recipe == "instruction_following":
        c.lora.rank, c.lora.alpha = 32, 64.0
        c.data.num_negatives = 15
        c.loss.kind = "per_query"
    return c
