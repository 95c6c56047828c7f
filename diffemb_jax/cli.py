"""`diffemb`: convert | export | encode | evaluate | adapt | train | plan | demo | reproduce | bench | serve."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from diffemb_jax.errors import ConfigError, UserError


def _convert(args) -> None:
    from diffemb_jax.checkpoints import convert

    out = convert(args.src, args.out, dtype=args.dtype)
    print(f"converted {args.src} -> {out} ({_written_dtype(out)})")


def _export(args) -> None:
    from diffemb_jax.checkpoints import export_model
    from diffemb_jax.checkpoints.export import export_sentence_transformers

    merged = f" with {', then '.join(args.adapter)} merged" if args.adapter else ""
    if args.format == "hf":
        out = export_model(args.model, args.out, adapter=args.adapter, dtype=args.dtype)
        print(f"exported {args.model}{merged} -> {out} (Hugging Face directory, {_written_dtype(out)})")
        return
    prompts = _named_prompts(args.prompt, "--prompt") if args.prompt else None
    out = export_sentence_transformers(
        args.model, args.out, attention=args.attention or "bidirectional", pooling=args.pooling,
        skip_instruction=args.skip_instruction, max_length=args.max_length, prompts=prompts,
        default_prompt_name=args.default_prompt, adapter=args.adapter, dtype=args.dtype)
    print(f"exported {args.model}{merged} -> {out} (sentence-transformers folder: SentenceTransformer({str(out)!r}))")


def _written_dtype(out: Path) -> str:
    """What convert or export wrote, as --dtype auto reads it back: the dtype auto resolved to."""
    from diffemb_jax.checkpoints.checkpoint import checkpoint_dtype_bytes
    from diffemb_jax.checkpoints.dtypes import stored_dtype

    return stored_dtype("auto", lambda: checkpoint_dtype_bytes(out))


def _named_prompts(items: list[str], flag: str) -> dict[str, str]:
    """NAME=TEXT items -> {NAME: TEXT}."""
    prompts = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise UserError(f"{flag} {item!r}: give NAME=TEXT")
        prompts[name] = text
    return prompts


def _embedder(args):
    """The Embedder that encode and evaluate build from their shared flags (--mesh: all devices)."""
    from diffemb_jax import parallel
    from diffemb_jax.embedding import Embedder

    mesh = None
    if args.mesh:
        parallel.initialize_distributed()
        mesh = parallel.make_mesh(*args.mesh)
    return Embedder.from_pretrained(
        args.model, adapter=args.adapter, attention=args.attention, dtype=args.dtype, kernel=args.kernel,
        pooling=args.pooling, prompt_name=getattr(args, "prompt_name", None),
        skip_instruction=args.skip_instruction, max_length=args.max_length, batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens or None, pack_length=args.pack_length, mesh=mesh)


def _encode(args) -> None:
    import jax

    from diffemb_jax.embedding.dimensions import check_dimensions, truncate
    from diffemb_jax.embedding.files import check_output_path, read_texts, save_npy_atomic

    output = check_output_path(args.output)
    if args.dimensions is not None and args.dimensions < 1:
        raise UserError(f"--dimensions {args.dimensions}: give a positive number of components")
    texts = read_texts(args.input)
    embedder = _embedder(args)
    if args.dimensions is not None:  # checked before the texts are encoded
        check_dimensions([args.dimensions], embedder.model.cfg.hidden_size)
    vectors = embedder.encode(texts, instruction=args.instruction)
    if args.dimensions is not None:
        vectors = truncate(vectors, args.dimensions)
    if jax.process_index() == 0:  # one output, written by the lead process
        save_npy_atomic(output, vectors)
        print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} float32 embeddings to {output}")


# Per-benchmark default of --max-length: LongEmbed's longest context, BRIGHT's training length.
EVALUATE_MAX_LENGTH = {"longembed": 32768, "bright": 4096}
MAX_BATCH_TOKENS_HELP = ("at most this many padded tokens per batch, so long documents go fewer at a time "
                         "(one text that is longer goes alone); 0: no limit")
BATCH_SIZE_HELP = "rows per batch (a row holds one text, or several short ones packed)"
MODEL_HELP = ("converted directory, HF model directory, .gguf file, sentence-transformers folder, Hub id in the "
              "local cache, or a PEFT adapter folder (llm2vec's MNTP checkpoints: the base it names, with it merged)")
ADAPTER_HELP = ("PEFT LoRA adapter directory merged into the model's weights; repeat to stack several, merged "
                "in the order given (llm2vec: --adapter MNTP_DIR --adapter SUPERVISED_DIR)")
FOLDER_DEFAULT_HELP = "default: a sentence-transformers folder's own setting, else %s"
PACK_LENGTH_HELP = ("texts of at most this many tokens are packed several to a row, each attending within "
                    "itself (no compute on padding); 0: one text a row")


def _evaluate(args) -> None:
    """Score a model on a BEIR folder (retrieval), on sentence pairs (similarity) or on one of the
    paper's benchmarks (longembed, bright, followir): a markdown table, and with --output the same
    numbers as JSON, written atomically by the lead process. Data are read and checked first."""
    import jax

    from diffemb_jax.embedding.files import check_output_path, write_json_atomic

    output = check_output_path(args.output, ".json") if args.output else None
    if args.max_length is None:
        args.max_length = EVALUATE_MAX_LENGTH.get(args.task)  # None: the model's (sentence-transformers), or 512
    evaluate = {"retrieval": _evaluate_retrieval, "similarity": _evaluate_similarity, "longembed": _evaluate_longembed,
                "bright": _evaluate_bright, "followir": _evaluate_followir}[args.task]
    run = evaluate(args)  # reads the data; returns the work that needs the model
    report, text = run(_embedder(args))
    if jax.process_index() != 0:
        return
    print(text)
    if output is not None:
        write_json_atomic(output, {"task": args.task, "model": str(args.model), "data": str(args.data), **report})
        print(f"wrote {output}")


def _evaluate_retrieval(args):
    from diffemb_jax.embedding.dimensions import check_dimensions
    from diffemb_jax.evaluation.beir import load_beir
    from diffemb_jax.evaluation.retrieval import evaluate_embedder, evaluate_embedder_by_dimension

    data = load_beir(args.data, args.split)
    names = {"ndcg@10": "nDCG@10", "map@100": "MAP@100", "recall@100": "Recall@100", "mrr@10": "MRR@10"}

    def run(embedder):
        encode_queries = lambda texts: embedder.encode(texts, instruction=args.query_instruction)  # noqa: E731
        report = {"split": args.split, "query_instruction": args.query_instruction, "top_k": args.top_k,
                  "queries": len(data.qrels), "documents": len(data.corpus)}
        title = f"retrieval of {args.model} on {args.data} ({len(data.qrels)} queries, {len(data.corpus)} documents)"
        if args.dimensions:  # encoded once at full size, each N its first components re-normalised
            check_dimensions(args.dimensions, embedder.model.cfg.hidden_size)
            by_dim = evaluate_embedder_by_dimension(encode_queries, embedder.encode, data.queries, data.corpus,
                                                    data.qrels, args.dimensions, top_k=args.top_k)
            report.update(dimensions=list(args.dimensions), metrics={str(n): m for n, m in by_dim.items()})
            return report, _metrics_by_dimension_table(f"{title}, embeddings cut to their first N components:",
                                                       names, by_dim)
        metrics = evaluate_embedder(encode_queries, embedder.encode, data.queries, data.corpus, data.qrels,
                                    top_k=args.top_k)
        return {**report, "metrics": metrics}, _metrics_table(f"{title}:", names, metrics)
    return run


def _metrics_by_dimension_table(title: str, names: dict[str, str], by_dim: dict[int, dict[str, float]]) -> str:
    return (f"{title}\n| N | " + " | ".join(names.values()) + " |\n|---:|" + "---:|" * len(names) + "\n"
            + "\n".join(f"| {n} | " + " | ".join(f"{m[k]:.4f}" for k in names) + " |" for n, m in by_dim.items()))


def _evaluate_similarity(args):
    from diffemb_jax.evaluation.similarity import evaluate_similarity, read_pairs

    data = read_pairs(args.data)
    names = {"spearman": "Spearman", "pearson": "Pearson"}

    def run(embedder):
        metrics = evaluate_similarity(lambda texts: embedder.encode(texts, instruction=args.instruction), data)
        metrics.pop("pairs")
        report = {"instruction": args.instruction, "pairs": len(data.scores), "metrics": metrics}
        return report, _metrics_table(f"similarity of {args.model} on {args.data} ({len(data.scores)} pairs):",
                                      names, metrics)
    return run


def _metrics_table(title: str, names: dict[str, str], metrics: dict[str, float]) -> str:
    return (f"{title}\n| " + " | ".join(names.values()) + " |\n|" + "---:|" * len(names) + "\n| "
            + " | ".join(f"{metrics[k]:.4f}" for k in names) + " |")


def _evaluate_longembed(args):
    from diffemb_jax.evaluation import longembed

    data = longembed.load_longembed(args.data, args.tasks, args.lengths)

    def run(embedder):
        result = longembed.score_longembed(embedder, data, args.query_instruction or None)
        report = {"query_instruction": args.query_instruction, "max_length": args.max_length,
                  "lengths": args.lengths, "sizes": result.sizes,
                  "metrics": {"ndcg@10 (real) / mean ndcg@1 (synthetic)": result.scores, "average": result.average,
                              "ndcg@1 by length": result.by_length}}
        return report, f"LongEmbed, {args.model} (max length {args.max_length}):\n{longembed.table(result)}"
    return run


def _evaluate_bright(args):
    from diffemb_jax.evaluation import bright

    data = bright.load_bright(args.data, args.domains, args.long)
    instructions = {d: args.query_instruction for d in data} if args.query_instruction is not None else None

    def run(embedder):
        result = bright.score_bright(embedder, data, long=args.long, instructions=instructions, top_k=args.top_k)
        report = {"long": args.long, "top_k": args.top_k, "max_length": args.max_length,
                  "instructions": {d: (instructions or {}).get(d, bright.DOMAINS[d][1]) for d in data},
                  "sizes": result.sizes, "metrics": result.metrics, "average_ndcg@10": result.average}
        return report, f"BRIGHT nDCG@10, {args.model} (max length {args.max_length}):\n{bright.table(result)}"
    return run


def _evaluate_followir(args):
    from diffemb_jax.evaluation import followir

    data = followir.load_followir(args.data, args.tasks)

    def run(embedder):
        result = followir.score_followir(embedder, data, args.query_instruction or None)
        report = {"query_instruction": args.query_instruction, "max_length": embedder.max_length,
                  "sizes": result.sizes, "metrics": result.scores,
                  "average": {"base": result.average("base"), "p-MRR": result.average("p-MRR")}}
        return report, f"FollowIR, {args.model} (max length {embedder.max_length}):\n{followir.table(result)}"
    return run


def _training_flags(command: str, argv: list[str]):
    """--config FILE --workdir DIR [--config.key=value ...] (absl flags, as ml_collections configs are
    meant to be overridden; an unknown key is an error naming it)."""
    from absl import flags
    from ml_collections import config_flags

    from diffemb_jax.training.config import check_choices

    if {"-h", "--help", "-help", "--helpfull"} & set(argv):
        print(_training_help(command))
        raise SystemExit(0)
    argv = [f"diffemb {command}", *argv]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "training config file (get_config())", flag_values=values,
                                    lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "checkpoints, metrics and data cache go here", flag_values=values)
    try:
        values(argv)
    except (flags.Error, AttributeError, KeyError) as e:
        raise ConfigError(str(e)) from e
    if values.config is None or values.workdir is None:
        raise ConfigError(f"usage: diffemb {command} --config configs/X.py --workdir DIR [--config.key=value ...]")
    check_choices(values.config)  # before the distributed runtime starts, or any weight loads
    return values.config, values.workdir


def _training_help(command: str) -> str:
    """Usage and every config key with its default, for `diffemb train|plan|adapt --help`."""
    from diffemb_jax.training.config import adapt_config, base_config

    config, example = ((adapt_config(), "configs/adapt.py:diffusion") if command == "adapt"
                       else (base_config(), "configs/recipe.py:dream-7b,long_documents"))
    keys = []

    def walk(node, prefix):
        for key, value in node.items():
            if hasattr(value, "items"):
                walk(value, f"{prefix}{key}.")
            else:
                keys.append(f"  --config.{prefix}{key}={value!r}")

    walk(config, "")
    return (f"usage: diffemb {command} --config FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...]\n"
            f"  e.g. --config={example}; a recipe file's get_config() starts from the defaults below\n"
            f"config keys (defaults):\n" + "\n".join(keys))


def _train(argv: list[str]) -> None:
    from diffemb_jax.training.trainer import ADAPTER_DIR, train

    config, workdir = _training_flags("train", argv)
    history = train(config, workdir)
    if history:
        print(f"trained to step {history[-1]['step']}: loss {history[-1]['loss']:.4f}; workdir {workdir}")
    adapter = Path(workdir) / ADAPTER_DIR
    if adapter.is_dir():
        print(f"PEFT adapter: {adapter} (diffemb encode|evaluate|export --adapter {adapter})")


def _adapt(argv: list[str]) -> None:
    from diffemb_jax.training.adapt import MODEL_DIR, adapt

    config, workdir = _training_flags("adapt", argv)
    history = adapt(config, workdir)
    if history:
        last = history[-1]
        print(f"adapted to step {last['step']}: loss {last['loss']:.4f}, masked-token accuracy {last['accuracy']:.3f}")
    model = Path(workdir) / MODEL_DIR
    if model.is_dir():
        print(f"adapted model: {model} (diffemb encode|train|evaluate|export take it as --model / model.path)")


def _plan(argv: list[str]) -> None:
    """Per-device memory of the config's train step on its mesh, from XLA's compiled memory analysis
    (from shapes: no weights or data are read)."""
    from diffemb_jax import parallel
    from diffemb_jax.memory import device_capacity
    from diffemb_jax.training.plan import memory_plan
    from diffemb_jax.training.trainer import check_config

    config, _ = _training_flags("plan", argv)
    parallel.initialize_distributed(config.distributed)
    check_config(config, data=False)
    plan = memory_plan(config)
    print(f"per-device memory of one train step, mesh {dict(config.mesh)} "
          f"(global batch {config.train.global_batch_size}):")
    print("| part | MiB |\n|---|---:|")
    for part, size in plan.items():
        print(f"| {part} | {size / 2**20:.1f} |")
    device, capacity = device_capacity()
    if capacity is None:
        print(f"the device ({device}) gives no memory limit: compare the total with what it holds")
    elif plan["total"] <= capacity:
        print(f"fits: {plan['total'] / 2**30:.1f} of the {capacity / 2**30:.1f} GiB the device ({device}) holds")
    else:
        print(f"does not fit: {plan['total'] / 2**30:.1f} GiB, the device ({device}) holds "
              f"{capacity / 2**30:.1f}. Lower data.query_max_length / data.doc_max_length, set "
              "train.remat=full or train.grad_cache_chunk, or spread the model over more devices (mesh.fsdp)")


def _demo(args) -> None:
    import dataclasses

    from diffemb_jax import demo

    rows = tuple(args.rows.split(",")) if args.rows else demo.DEFAULT_SETTINGS.rows
    demo.run(dataclasses.replace(demo.DEFAULT_SETTINGS, workdir=args.workdir, rows=rows))


def _reproduce(args) -> None:
    from diffemb_jax import reproduce

    reproduce.run(args.budget, workdir=args.workdir, model=args.model, seeds=args.seeds)


def _bench(args) -> None:
    from diffemb_jax.bench import compare, serve

    (serve.main if args.what == "serve" else compare.main)(args)


def _serve(args) -> None:
    from diffemb_jax.serve.server import build_service, read_api_key, serve

    prompts = _named_prompts(args.prompt, "--prompt")
    if args.max_wait_ms < 0 or args.max_inputs < 1 or args.max_queue < 1:
        raise UserError("--max-wait-ms must be >= 0, --max-inputs and --max-queue >= 1")
    api_key = read_api_key(args.api_key_file) if args.api_key_file else None
    embedder = _embedder(args)
    service = build_service(embedder, model_name=args.model_name or args.model,
                            max_batch_tokens=args.max_batch_tokens or 2**62, max_wait_ms=args.max_wait_ms,
                            max_inputs=args.max_inputs, max_queue=args.max_queue, prompts=prompts,
                            attention=embedder.options.attention)
    serve(service, host=args.host, port=args.port, api_key=api_key)


def build_parser() -> argparse.ArgumentParser:
    from diffemb_jax.bench import flags as bench_flags
    from diffemb_jax.checkpoints.dtypes import COMPUTE_DTYPE_HELP, DTYPE_CHOICES, STORED_DTYPE_HELP
    from diffemb_jax.embedding.embedder import DEFAULT_MAX_BATCH_TOKENS, PACK_LENGTH
    from diffemb_jax.embedding.pooling import POOLING_MODES
    from diffemb_jax.model import ATTENTION_MODES
    from diffemb_jax.model.attention import KERNELS

    parser = argparse.ArgumentParser(prog="diffemb", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error in the input too "
                        "(before the command: diffemb --debug encode ...)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="HF model directory or .gguf file -> converted directory")
    p.add_argument("src", help="HF model directory (config.json + safetensors/.bin) or a .gguf file")
    p.add_argument("out", help="output directory (must not exist)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=STORED_DTYPE_HELP)
    p.set_defaults(func=_convert)

    p = sub.add_parser("export", help="model (converted, HF or .gguf), optionally with a PEFT LoRA adapter "
                       "merged in -> Hugging Face directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("out", help="output directory (must not exist)")
    p.add_argument("--adapter", action="append", default=None, help=ADAPTER_HELP)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=STORED_DTYPE_HELP)
    p.add_argument("--format", choices=("hf", "sentence-transformers"), default="hf",
                   help="hf: the Hugging Face directory; sentence-transformers: that directory with Pooling and "
                   "Normalize modules and prompts, which SentenceTransformer(OUT) loads (needs --attention causal)")
    p.add_argument("--attention", choices=ATTENTION_MODES, default=None, help="sentence-transformers: the attention "
                   "the model is used with; it runs decoders causally, so only causal is written")
    p.add_argument("--pooling", choices=POOLING_MODES, default=None, help="sentence-transformers: default the "
                   "source folder's, else mean")
    p.add_argument("--skip-instruction", action="store_true", default=None,
                   help="sentence-transformers: the prompt's tokens are not pooled (include_prompt false)")
    p.add_argument("--max-length", type=int, default=None, help="sentence-transformers: max_seq_length (default "
                   "the source folder's, else 512)")
    p.add_argument("--prompt", action="append", default=[], metavar="NAME=TEXT",
                   help="sentence-transformers: a prompt put verbatim before texts; repeatable")
    p.add_argument("--default-prompt", default=None, metavar="NAME", help="sentence-transformers: the prompt "
                   "encode uses when none is named")
    p.set_defaults(func=_export)

    p = sub.add_parser("encode", help="embed the lines of a .txt or .jsonl file into a .npy")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--adapter", action="append", default=None, help=ADAPTER_HELP + " (e.g. WORKDIR/adapter of "
                   "a training run)")
    p.add_argument("--input", required=True, help=".txt (one text a line) or .jsonl (field \"text\")")
    p.add_argument("--output", required=True, help="OUT.npy; row i is line i of the input")
    p.add_argument("--attention", choices=ATTENTION_MODES, default=None, help=FOLDER_DEFAULT_HELP % "bidirectional")
    p.add_argument("--pooling", choices=POOLING_MODES, default=None, help=FOLDER_DEFAULT_HELP % "mean")
    p.add_argument("--skip-instruction", action="store_true", default=None,
                   help="pool only the tokens after the instruction")
    p.add_argument("--instruction", default=None, help="task instruction prepended to every text")
    p.add_argument("--prompt-name", default=None, help="a sentence-transformers folder's prompt to use instead of "
                   "its default one")
    p.add_argument("--max-length", type=int, default=None, help=FOLDER_DEFAULT_HELP % 512)
    p.add_argument("--batch-size", type=int, default=16, help=BATCH_SIZE_HELP)
    p.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS, help=MAX_BATCH_TOKENS_HELP)
    p.add_argument("--pack-length", type=int, default=PACK_LENGTH, help=PACK_LENGTH_HELP)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=COMPUTE_DTYPE_HELP)
    p.add_argument("--kernel", choices=KERNELS, default="auto",
                   help="attention kernel: auto picks cudnn on GPU, splash on TPU, xla elsewhere")
    p.add_argument("--mesh", type=_mesh_sizes, default=None, metavar="DATA,FSDP,TENSOR",
                   help="shard over all devices, e.g. -1,1,1 (data parallel) or 4,1,2; default: one device")
    p.add_argument("--dimensions", type=int, default=None, metavar="N",
                   help="keep the first N components of each embedding, L2-normalised again (a model trained "
                   "with loss.matryoshka_dims); default: all")
    p.set_defaults(func=_encode)

    p = sub.add_parser("evaluate", help="retrieval metrics on a BEIR folder, or similarity correlations on pairs")
    tasks = p.add_subparsers(dest="task", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help=MODEL_HELP)
    common.add_argument("--adapter", action="append", default=None, help=ADAPTER_HELP)
    common.add_argument("--attention", choices=ATTENTION_MODES, default=None,
                        help=FOLDER_DEFAULT_HELP % "bidirectional")
    common.add_argument("--pooling", choices=POOLING_MODES, default=None, help=FOLDER_DEFAULT_HELP % "mean")
    common.add_argument("--skip-instruction", action="store_true", default=None,
                        help="pool only the tokens after the instruction")
    common.add_argument("--max-length", type=int, default=None, help="tokens per text; default: 512, longembed "
                        f"{EVALUATE_MAX_LENGTH['longembed']}, bright {EVALUATE_MAX_LENGTH['bright']}")
    common.add_argument("--batch-size", type=int, default=16, help=BATCH_SIZE_HELP)
    common.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS, help=MAX_BATCH_TOKENS_HELP)
    common.add_argument("--pack-length", type=int, default=PACK_LENGTH, help=PACK_LENGTH_HELP)
    common.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=COMPUTE_DTYPE_HELP)
    common.add_argument("--kernel", choices=KERNELS, default="auto")
    common.add_argument("--mesh", type=_mesh_sizes, default=None, metavar="DATA,FSDP,TENSOR", help="shard over all devices (as encode)")
    common.add_argument("--output", default=None, help="also write the results to this .json file")
    t = tasks.add_parser("retrieval", parents=[common], help="nDCG@10, MAP@100, Recall@100, MRR@10 on a BEIR folder")
    t.add_argument("--data", required=True, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv")
    t.add_argument("--split", default="test", help="qrels/SPLIT.tsv to score")
    t.add_argument("--query-instruction", default=None, help="task instruction put in front of every query")
    t.add_argument("--top-k", type=int, default=100, help="documents retrieved per query (the @100 metrics need 100)")
    t.add_argument("--dimensions", type=_dimensions_list, default=None, metavar="N,N,...",
                   help="score the embeddings cut to each N first components (re-normalised), from one encode: "
                   "a row of metrics per N, e.g. 64,128,256")
    t = tasks.add_parser("similarity", parents=[common], help="Spearman and Pearson of cosine against gold scores")
    t.add_argument("--data", required=True, help=".tsv (header with sentence1, sentence2, score) or .jsonl")
    t.add_argument("--instruction", default=None, help="task instruction put in front of both sentences")
    _benchmark_parsers(tasks, common)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("demo", help="the method end to end on the bundled SmolLM2-135M: a LoRA embedder trained "
                       "with causal attention, with bidirectional attention, and bidirectionally after a "
                       "masked-diffusion adaptation, on docstring -> code search over the standard library; "
                       "nDCG@10 on held-out modules before and after")
    p.add_argument("--workdir", default=None, help="where the adapted model (made once, reused after) and each "
                   "row's trained adapter are kept (default: the project's cache, <cache>/demo)")
    p.add_argument("--rows", default=None, metavar="a,b,d", help="the rows: a causal, b bidirectional, d bidirectional "
                   "after masked diffusion (default: a,d)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("reproduce", help="the paper's comparison at small scale: SmolLM2-135M causal, bidirectional, "
                       "after MNTP and after masked-diffusion adaptation, each fine-tuned alike, nDCG@10 on held-out "
                       "packages (mean ± sd over seeds)")
    p.add_argument("scale", choices=("small",))
    p.add_argument("--budget", choices=("tiny", "small", "large"), default=None,
                   help="tiny: a smoke run; small: about 90 minutes on a 2-core CPU (the default on a CPU); large: "
                   "the default on a GPU or TPU")
    p.add_argument("--workdir", default=None, help="where every stage is kept (default: the cache's reproduce/BUDGET)")
    p.add_argument("--model", default=None, help="the autoregressive base model (default: the bundled SmolLM2-135M)")
    p.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds a row (default: the budget's, 3)")
    p.set_defaults(func=_reproduce)

    p = sub.add_parser("serve", help="an HTTP embedding server: OpenAI's POST /v1/embeddings, TEI's POST /embed, "
                       "/health, /info, /metrics; requests batched together on the device")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--adapter", action="append", default=None, help=ADAPTER_HELP)
    p.add_argument("--model-name", default=None, help="the name /v1/embeddings answers with (default: --model)")
    p.add_argument("--attention", choices=ATTENTION_MODES, default=None, help=FOLDER_DEFAULT_HELP % "bidirectional")
    p.add_argument("--pooling", choices=POOLING_MODES, default=None, help=FOLDER_DEFAULT_HELP % "mean")
    p.add_argument("--skip-instruction", action="store_true", default=None,
                   help="pool only the tokens after the instruction")
    p.add_argument("--prompt", action="append", default=[], metavar="NAME=INSTRUCTION",
                   help="an instruction a request can name (TEI's prompt_name); repeatable")
    p.add_argument("--max-length", type=int, default=None, help="longest input in tokens (longer: 400, or cut "
                   "when the request says truncate); " + FOLDER_DEFAULT_HELP % 512)
    p.add_argument("--batch-size", type=int, default=16, help=BATCH_SIZE_HELP)
    p.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS,
                   help="tokens the device loop takes from the queue at once, and " + MAX_BATCH_TOKENS_HELP)
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long the oldest queued request waits "
                   "for others to batch with")
    p.add_argument("--max-inputs", type=int, default=512, help="most inputs a request may hold")
    p.add_argument("--max-queue", type=int, default=8192, help="most inputs queued; past it: 429 with Retry-After")
    p.add_argument("--pack-length", type=int, default=PACK_LENGTH, help=PACK_LENGTH_HELP)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=COMPUTE_DTYPE_HELP)
    p.add_argument("--kernel", choices=KERNELS, default="auto")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key-file", default=None, help="file holding the key: requests then need "
                   "Authorization: Bearer <key> (all but /health)")
    p.set_defaults(func=_serve, mesh=None)

    bench_flags.add_parser(sub).set_defaults(func=_bench)
    return parser


def _mesh_sizes(text: str) -> tuple[int, int, int]:
    from diffemb_jax.parallel import parse_mesh

    try:
        return parse_mesh(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _dimensions_list(text: str) -> tuple[int, ...]:
    from diffemb_jax.embedding.dimensions import parse_dimensions

    try:
        return parse_dimensions(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _benchmark_parsers(tasks, common) -> None:
    """evaluate longembed | bright | followir: the paper's benchmarks with its settings as defaults."""
    from diffemb_jax.evaluation import bright, followir, longembed

    source_help = "local copy of the dataset repository, or its id if it is in the HF cache (default: %(default)s)"
    t = tasks.add_parser("longembed", parents=[common], help="LongEmbed: 4 tasks at nDCG@10, Passkey and Needle at "
                         "nDCG@1 over context lengths 256..32768")
    t.add_argument("--data", default=longembed.DEFAULT_SOURCE, help=source_help)
    t.add_argument("--tasks", nargs="+", choices=tuple(longembed.TASKS), default=list(longembed.TASKS))
    t.add_argument("--lengths", nargs="+", type=int, default=list(longembed.LENGTHS),
                   help="Passkey and Needle context lengths to score")
    t.add_argument("--query-instruction", default=longembed.INSTRUCTION, help="\"\" for none (default: %(default)s)")
    t = tasks.add_parser("bright", parents=[common], help="BRIGHT: nDCG@10 on twelve domains, excluded_ids applied")
    t.add_argument("--data", default=bright.DEFAULT_SOURCE, help=source_help)
    t.add_argument("--domains", nargs="+", choices=tuple(bright.DOMAINS), default=None, help="default: all")
    t.add_argument("--long", action="store_true", help="the long_documents corpus and gold_ids_long")
    t.add_argument("--top-k", type=int, default=bright.TOP_K)
    t.add_argument("--query-instruction", default=None, help="one instruction for every domain instead of the "
                   "per-domain ones (\"\" for none)")
    t = tasks.add_parser("followir", parents=[common], help="FollowIR: Robust04, News21, Core17 reranking; "
                         "MAP@1000 / nDCG@5 and p-MRR")
    t.add_argument("--data", default=None, help="folder with one subfolder a task (Robust04InstructionRetrieval, "
                   "News21InstructionRetrieval, Core17InstructionRetrieval); default: mteb/<Task>InstructionRetrieval "
                   "from the HF cache")
    t.add_argument("--tasks", nargs="+", choices=tuple(followir.TASKS), default=list(followir.TASKS))
    t.add_argument("--query-instruction", default=followir.INSTRUCTION, help="\"\" for none (default: %(default)s)")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    debug = argv[:1] == ["--debug"]  # global, before the command: train|plan|adapt read their own flags
    argv = argv[1:] if debug else argv
    if argv[:1] != ["bench"]:  # the bench times compilation itself
        from diffemb_jax.cache import use_compilation_cache

        use_compilation_cache()
    if argv[:1] in (["train"], ["plan"], ["adapt"]):
        from diffemb_jax.training.trainer import TrainingDiverged

        work = {"train": _train, "plan": _plan, "adapt": _adapt}[argv[0]]
        return _run(argv[0], lambda: work(argv[1:]), debug, (TrainingDiverged,))
    args = build_parser().parse_args(argv)
    return _run(args.command, lambda: args.func(args), debug)


def _run(command: str, work, debug: bool, more_errors: tuple = ()) -> int:
    """Run a command; a UserError (bad input, a checkpoint or config that does not fit) exits 2 with
    its message, or with --debug its traceback. Anything else is a bug and keeps its traceback.
    OSError is not caught: the CLI cannot tell a path the user gave from one the code built wrong;
    the paths the user names are checked where they are read, and refused as UserErrors."""
    try:
        work()
    except (UserError, *more_errors) as e:
        if debug:
            raise
        print(f"diffemb {command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
