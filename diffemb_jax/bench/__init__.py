"""`diffemb bench encode|train|long|serve`: is JAX faster, and lighter, than the PyTorch reference?

encode: both frameworks embed the same texts (docstrings of the standard library's functions, the
corpus of the demo's task, cut to at most --max-length tokens) with the same weights, tokens, batch
size and bucket lengths, bidirectional attention and mean pooling; each framework encodes them all
once untimed (warm-up: JAX compiles every batch shape there), then once timed. JAX packs texts of
at most --pack-length tokens several to a row (the Embedder's default); PyTorch, the reference, runs
one text a row, and so does JAX with --pack-length 0: the same batches, padding included.

train: both frameworks run the same contrastive LoRA train step on the same token ids: --queries
queries (a docstring's first sentence, at most --query-length tokens), their positives (the
docstring) and hard negatives (the next docstring, most often of the same module), documents at
most --doc-length tokens. PyTorch, as llm2vec does, pads each side to its longest text; JAX runs the
train step's own layout, every text packed into rows as long as the bucket of the longest
(batching/step.py; "tokens computed" counts both). Bidirectional attention, mean pooling,
in-batch InfoNCE over [positives; negatives] (cosine x 50), LoRA r=--lora-rank, alpha=2r, dropout
--lora-dropout on q,k,v,o,gate,up,down, AdamW (weight decay 0, the HF linear schedule from lr to 0
over all the steps run) after clipping gradients to norm 1: the recipe's settings
(training/config.py) where the bench does not set its own. JAX runs the project's own train step (its
own LoRA layers), compiled ahead of time (compile s); PyTorch runs transformers + peft. --warmup-steps steps
are timed apart from the --steps timed ones. LoRA B starts at zero, so the first step's loss is the
base model's in every run and must agree; after that the two frameworks draw different LoRA A
initialisations and dropout masks, so losses only stay close.

--grad-cache-chunk N runs JAX's GradCache step (training/step.py) with N packed rows a chunk: the
plain step's loss and gradients for one more forward pass, with one chunk's activations live at a
time; PyTorch runs its plain step.

--scan-layers runs JAX's decoder layers as one lax.scan (ForwardOptions.scan_layers): one layer compiled
instead of each, the same numbers, and a copy of the layers' weights while it runs.

--remat picks what JAX keeps for the backward pass (the decoder's REMAT_POLICIES: none, full =
nothing saved, dots = projection outputs saved, dots_all = attention's matmuls too), or compares a
comma-separated list of them (all: every one): one JAX run per policy. PyTorch runs once per
checkpointing setting those need: off for none, on (transformers' gradient checkpointing, as the
recipe does) for any other; each policy's tokens/s ratio is against its match. The summary names the
fastest policy and the one of lowest peak memory (device memory on an accelerator, else the timed
steps' peak RSS), also in the report's best_remat.

long: one document at each of --lengths tokens (default 1024 ... 32768, the LongEmbed Passkey and
Needle lengths), batch 1, each length in a child process of its own (so its peak memory is its
own), shortest first: the largest length that fits and its time. A run that runs out of memory says
so, and the longer ones of that framework are not tried; nor is a length whose time (or, on the CPU,
whose peak RSS against the memory available) would pass --time-limit seconds, predicted from the two
lengths before it with growth at most quadratic in length. `long --compile-only` answers the same
question in seconds: JAX alone compiles the encoder from the shape (--shape's, or --model's config;
no weights made or read, nothing run) and reports XLA's memory analysis a length (plan.py).

serve: `diffemb serve` under a bounded load, against `diffemb encode` offline and a
sentence-transformers loop on the same texts (serve.py says how).

--model benches a checkpoint; --shape a named model shape (shapes.SHAPES) at random weights, seeded,
written once to the cache ($DIFFEMB_CACHE, else ~/.cache/diffemb-jax, under bench/) and reused, with
the bundled SmolLM2 tokenizer or --tokenizer.

Both report model TFLOP/s: matrix-product FLOPs of the useful work (formulas in flops.py's
FORWARD_FORMULA and TRAIN_FORMULA, padding not counted) over the timed seconds, and MFU against
--peak-tflops, or against the known peak of the device each ran on (flops.KNOWN_PEAK_TFLOPS); on
CPU no peak is assumed.

Devices: JAX runs on its default device; the PyTorch side on CUDA where torch sees a GPU (--dtype
bfloat16 loads bf16 weights there), else on the CPU. A summary line warns when one ran on the CPU and
the other did not.

--mesh DATA,FSDP,TENSOR (encode, train): JAX runs on a mesh of every device, as training and the
Embedder place things on one (rows over data x fsdp, weights by their logical axes), instead of on
one device; PyTorch stays on one, so the ratios are also given per device, and MFU counts the
mesh's devices.

--profile DIR: after its timed part, each run profiles one more pass (encode: the texts; train: one
step; long: the document) into DIR/<run label>: JAX an XProf trace (`xprof --logdir DIR/<run>`, or
perfetto_trace.json.gz in ui.perfetto.dev), PyTorch a Chrome trace (trace.json) and its operators'
totals (operators.txt). The timed figures are never the profiler's.

--no-vs-torch runs JAX alone: no ratios, and no torch or peft needed but to write --shape's weights.

Each run (a framework; for train, with its remat setting) is a child process of its own, one after
the other, so the peak memory reported is that run's alone. RSS figures read /proc, so they are
Linux-only. On an accelerator, peak device memory is the allocator's (JAX memory_stats, torch
max_memory_allocated), null on the CPU.
"""

# This package's __init__ imports nothing: a worker (`python -m diffemb_jax.bench --worker`, see
# __main__.py) loads only its own framework, so that neither's memory counts in the other's figures.
# The command: diffemb_jax.bench.args (its flags), diffemb_jax.bench.compare.main (its work).
