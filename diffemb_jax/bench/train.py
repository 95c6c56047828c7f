"""`diffemb bench train`, the parent's part: one step's batch (padded as llm2vec pads it for PyTorch,
packed as the train step packs it for JAX), a run per --remat policy, the step's model FLOPs, and
the comparison: tokens/s ratios, first losses that must agree, the best policy."""

from __future__ import annotations

import numpy as np

from diffemb_jax.bench.corpus import make_triples, padded
from diffemb_jax.bench.flags import RECIPE, batch_shards, mesh_of, remat_policies
from diffemb_jax.bench.flops import FORWARD_FORMULA, TRAIN_FORMULA, train_flops
from diffemb_jax.bench.report import FRAMEWORKS, label, speed_ratio
from diffemb_jax.model.lora import DEFAULT_TARGETS
from diffemb_jax.batching import SIDES, pack_step, pad_rows, padded_rows

# Two runs' first losses (LoRA B = 0: the base model's loss) agree within this, by dtype: cosine x 50
# magnifies bf16's rounding (the default bench on SmolLM2: JAX 1.683, PyTorch 1.743; float32 1.756).
FIRST_LOSS_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1}

COLUMNS = (("device", "{device}"), ("devices", "{devices}"), ("remat", "{remat}"),
           ("tokens/s", "{tokens_per_s:.0f}"), ("texts/s", "{texts_per_s:.1f}"),
           ("tokens computed", "{computed_tokens}"),
           ("model TFLOP/s", "{model_tflops_per_s:.3f}"), ("step s", "{step_seconds:.2f}"),
           ("compile s", "{compile_seconds:.2f}"), ("warm-up s", "{warmup_seconds:.2f}"),
           ("peak RSS MB", "{peak_rss_mb:.0f}"), ("timed steps' peak RSS MB", "{timed_peak_rss_mb:.0f}"),
           ("peak device MB", "{peak_device_mb:.0f}"),
           ("cores used", "{cores_used:.2f}"), ("load 1 min", "{load_average_1m:.2f}"),
           ("first loss", "{first_loss:.6f}"), ("last loss", "{last_loss:.6f}"))


def prepare(args, tokenizer) -> tuple[dict, dict]:
    """One step's batch: PyTorch's as llm2vec's (each side padded to its longest), JAX's packed; the
    reference recipe (training/config.py: loss scale, seed, learning rate, clipping) on both sides."""
    triples = make_triples(args.queries)
    lengths = {"query": args.query_length, "positive": args.doc_length, "negative": args.doc_length}
    batch = {side: padded(tokenizer, [t[i] for t in triples], lengths[side]) for i, side in enumerate(SIDES)}
    mesh = mesh_of(args.mesh)
    packed = packed_step(batch, max(lengths.values()), batch_shards(mesh))
    computed = {"jax": sum(map(len, packed["input_ids"])),
                "torch": sum(len(row) for side in SIDES for row in batch[side]["input_ids"])}
    settings = {"queries": args.queries, "query_length": args.query_length, "doc_length": args.doc_length,
                "tokens_per_step": sum(sum(map(sum, batch[side]["padding_mask"])) for side in SIDES),
                "computed_tokens": computed, "packed_rows": len(packed["input_ids"]), "mesh": mesh,
                "warmup_steps": args.warmup_steps, "steps": args.steps, "dtype": args.dtype,
                "remat": remat_policies(args.remat), "grad_cache_chunk": args.grad_cache_chunk,
                "attention": "bidirectional", "pooling": "mean", "loss": "in-batch InfoNCE, cosine x scale",
                "scale": RECIPE.loss.scale, "seed": RECIPE.train.seed,
                "lora": {"rank": args.lora_rank, "alpha": 2.0 * args.lora_rank, "dropout": args.lora_dropout,
                         "targets": DEFAULT_TARGETS},
                "optimizer": {"name": "AdamW", "lr": RECIPE.train.lr, "weight_decay": RECIPE.train.weight_decay,
                              "grad_clip": RECIPE.train.grad_clip,
                              "schedule": "linear from lr to 0 over warmup_steps + steps, no warm-up"}}
    return settings, {"batch": batch, "packed": packed}


def packed_step(batch: dict, length: int, shards: int = 1) -> dict[str, list[list[int]]]:
    """The train step's layout of `batch` (batching/step.py), texts of at most `length` tokens:
    packed into rows as long as the bucket of the longest, every token embedded, the row count
    rounded as the trainer rounds it for `shards` batch shards. The batching call sites are here."""
    sides = {}
    for side in SIDES:
        mask = np.asarray(batch[side]["padding_mask"], np.int32)
        ids = np.pad(np.asarray(batch[side]["input_ids"], np.int32), ((0, 0), (0, length - mask.shape[1])))
        mask = np.pad(mask, ((0, 0), (0, length - mask.shape[1])))
        sides[side] = {"input_ids": ids, "padding_mask": mask, "embed_mask": mask}
    queries = len(batch["query"]["input_ids"])
    rows = pack_step(sides, global_batch_size=queries, num_negatives=len(batch["negative"]["input_ids"]) // queries)
    rows = pad_rows(rows, padded_rows(len(rows["input_ids"]), shards, queries * len(SIDES)))
    return {key: value.tolist() for key, value in rows.items()}


def torch_remat(policy: str) -> str:
    """The PyTorch run a JAX policy is compared with: checkpointing off for none, else on (transformers'
    gradient checkpointing recomputes each layer from its input, as remat full does)."""
    return "none" if policy == "none" else "full"


def run_label(framework: str, remat: str) -> str:
    if framework == "jax":
        return f"JAX remat={remat}"
    return f"PyTorch checkpointing={'off' if remat == 'none' else 'on'}"


def runs(settings: dict) -> dict:
    """One JAX run per --remat policy, then one PyTorch run per checkpointing setting those need."""
    policies = settings["remat"]
    pairs = [("jax", p) for p in policies] + [("torch", torch_remat(p)) for p in policies]
    return {run_label(framework, remat): (framework, {"remat": remat}) for framework, remat in pairs}


def model_flops(job: dict, cfg: dict, result: dict) -> tuple[int, int, list[str]]:
    lengths = [sum(row) for side in SIDES for row in job["batch"][side]["padding_mask"]]
    per_step = sum(train_flops(cfg, n, job["lora"]["rank"]) for n in lengths)
    return per_step * job["steps"], job["tokens_per_step"] * job["steps"], [FORWARD_FORMULA, TRAIN_FORMULA]


def agreement(diff: float, dtype: str) -> str:
    tolerance = FIRST_LOSS_TOLERANCE[dtype]
    return "(agree)" if diff <= tolerance else f"(WARNING: more than {tolerance:g} apart in {dtype})"


# What best_remat's lowest memory compares: the allocator's peak on an accelerator; on the CPU the
# timed steps' peak RSS, as loading (the same for every policy) is left out of it.
MEMORY_MEASURES = {"peak_device_mb": "peak device memory", "timed_peak_rss_mb": "timed steps' peak RSS"}


def best_remat(runs: dict) -> dict:
    """The fastest JAX policy and the one of lowest peak memory; runs: {policy: result}."""
    memory = next(m for m in MEMORY_MEASURES if all(r[m] is not None for r in runs.values()))
    return {"fastest": max(runs, key=lambda p: runs[p]["tokens_per_s"]),
            "lowest_memory": min(runs, key=lambda p: runs[p][memory]), "memory": memory}


def summarize(results: dict) -> tuple[dict, list[str]]:
    """Each JAX policy against the PyTorch run with the matching checkpointing; the first losses of
    all runs must agree (LoRA B starts at zero: each is the base model's loss)."""
    runs_by = {f: {r["remat"]: r for r in results.values() if r["framework"] == f} for f in FRAMEWORKS}
    dtype = next(iter(results.values()))["dtype"]
    pairs, lines = {}, []
    for policy, jax_r in runs_by["jax"].items() if runs_by["torch"] else ():
        torch_r = runs_by["torch"][torch_remat(policy)]
        jax_label, torch_label = run_label("jax", policy), run_label("torch", torch_r["remat"])
        ratio, ratio_text = speed_ratio(jax_r, torch_r)
        pair = pairs[policy] = {"pytorch": torch_label, **ratio,
                                "first_loss_abs_diff": abs(jax_r["first_loss"] - torch_r["first_loss"])}
        lines += [f"{jax_label} / {torch_label} tokens/s ratio: {ratio_text}",
                  f"first-step loss: {jax_label} {jax_r['first_loss']:.6f}, {torch_label} "
                  f"{torch_r['first_loss']:.6f}, |diff| {pair['first_loss_abs_diff']:.2e} "
                  + agreement(pair["first_loss_abs_diff"], dtype)]
    chunk = next(iter(runs_by["jax"].values()))["grad_cache_chunk"] if runs_by["jax"] else 0
    if chunk:
        lines.append(f"JAX runs GradCache, {chunk} packed rows a chunk (the plain step's loss and gradients, one "
                     "chunk's activations live at a time); PyTorch its plain step")
    first = [r["first_loss"] for r in results.values()]
    summary = {"pairs": pairs, "first_loss_abs_diff": max(first) - min(first),
               "best_remat": best_remat(runs_by["jax"])}
    if len(results) > (2 if pairs else 1):
        lines.append(f"first-step loss of all {len(results)} runs: max - min {summary['first_loss_abs_diff']:.2e} "
                     + agreement(summary["first_loss_abs_diff"], dtype))
    if len(runs_by["jax"]) > 1:
        best = summary["best_remat"]
        fastest, lean = runs_by["jax"][best["fastest"]], runs_by["jax"][best["lowest_memory"]]
        lines.append(f"fastest JAX policy: remat={best['fastest']} ({fastest['tokens_per_s']:.0f} tokens/s); "
                     f"lowest peak memory: remat={best['lowest_memory']} "
                     f"({MEMORY_MEASURES[best['memory']]} {lean[best['memory']]:.0f} MB)")
    for key, r in results.items():
        lines.append(f"{label(key)} losses by step: " + ", ".join(f"{x:.4f}" for x in r["losses"]))
    return summary, lines
