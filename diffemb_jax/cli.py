"""`diffemb`: convert | export | encode | evaluate | train | plan | demo | bench."""

from __future__ import annotations

import argparse
import logging
import sys


def _convert(args) -> None:
    from conversion import convert

    out = convert(args.src, args.out, dtype=args.dtype)
    print(f"converted {args.src} -> {out}")


def _export(args) -> None:
    from conversion import export_model

    out = export_model(args.model, args.out, adapter=args.adapter, dtype=args.dtype)
    merged = f" with the adapter {args.adapter} merged" if args.adapter else ""
    print(f"exported {args.model}{merged} -> {out} (Hugging Face directory)")


def _embedder(args):
    """The Embedder that encode and evaluate build from their shared flags (--mesh: all devices)."""
    from diffemb_jax import parallel
    from diffemb_jax.embedding import Embedder

    mesh = None
    if args.mesh:
        parallel.initialize_distributed()
        mesh = parallel.make_mesh(*(int(n) for n in args.mesh.split(",")))
    return Embedder.from_pretrained(
        args.model, attention=args.attention, dtype=args.dtype, kernel=args.kernel, pooling=args.pooling,
        skip_instruction=args.skip_instruction, max_length=args.max_length, batch_size=args.batch_size, mesh=mesh)


def _encode(args) -> None:
    import jax

    from diffemb_jax.embedding.files import check_output_path, read_texts, save_npy_atomic

    output = check_output_path(args.output)
    texts = read_texts(args.input)
    embedder = _embedder(args)
    vectors = embedder.encode(texts, instruction=args.instruction)
    if jax.process_index() == 0:  # one output, written by the lead process
        save_npy_atomic(output, vectors)
        print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} float32 embeddings to {output}")


def _evaluate(args) -> None:
    """Score a model on a BEIR folder (retrieval) or on sentence pairs (similarity): a markdown table,
    and with --output the same numbers as JSON, written atomically by the lead process."""
    import json
    import os
    import tempfile

    import jax

    from diffemb_jax.embedding.files import check_output_path

    output = check_output_path(args.output, ".json") if args.output else None
    if args.task == "retrieval":  # read and check the data before loading the model
        from diffemb_jax.evaluation.beir import load_beir
        from diffemb_jax.evaluation.retrieval import evaluate_embedder

        data = load_beir(args.data, args.split)
        report = {"split": args.split, "query_instruction": args.query_instruction, "top_k": args.top_k,
                  "queries": len(data.qrels), "documents": len(data.corpus)}
        names = {"ndcg@10": "nDCG@10", "map@100": "MAP@100", "recall@100": "Recall@100", "mrr@10": "MRR@10"}
    else:
        from diffemb_jax.evaluation.similarity import evaluate_similarity, read_pairs

        data = read_pairs(args.data)
        report = {"instruction": args.instruction, "pairs": len(data.scores)}
        names = {"spearman": "Spearman", "pearson": "Pearson"}
    embedder = _embedder(args)
    if args.task == "retrieval":
        metrics = evaluate_embedder(lambda texts: embedder.encode(texts, instruction=args.query_instruction),
                                    embedder.encode, data.queries, data.corpus, data.qrels, top_k=args.top_k)
    else:
        metrics = evaluate_similarity(lambda texts: embedder.encode(texts, instruction=args.instruction), data)
        metrics.pop("pairs")
    if jax.process_index() != 0:
        return
    what = ", ".join(f"{v} {k}" for k, v in report.items() if k in ("queries", "documents", "pairs"))
    print(f"{args.task} of {args.model} on {args.data} ({what}):")
    print("| " + " | ".join(names.values()) + " |\n|" + "---:|" * len(names))
    print("| " + " | ".join(f"{metrics[k]:.4f}" for k in names) + " |")
    if output is not None:
        record = {"task": args.task, "model": str(args.model), "data": str(args.data), **report, "metrics": metrics}
        fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record, indent=2) + "\n")
            os.replace(tmp, output)
        except BaseException:
            os.unlink(tmp)
            raise
        print(f"wrote {output}")


def _training_flags(command: str, argv: list[str]):
    """--config FILE --workdir DIR [--config.key=value ...] (absl flags, as ml_collections configs are
    meant to be overridden; an unknown key is an error naming it)."""
    from absl import flags
    from ml_collections import config_flags

    argv = [f"diffemb {command}", *argv]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "training config file (get_config())", flag_values=values,
                                    lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "checkpoints, metrics and data cache go here", flag_values=values)
    try:
        values(argv)
    except (flags.Error, AttributeError, KeyError) as e:
        raise ValueError(str(e)) from e
    if values.config is None or values.workdir is None:
        raise ValueError(f"usage: diffemb {command} --config configs/X.py --workdir DIR [--config.key=value ...]")
    return values.config, values.workdir


def _train(argv: list[str]) -> None:
    from diffemb_jax.training.trainer import train

    config, workdir = _training_flags("train", argv)
    history = train(config, workdir)
    if history:
        print(f"trained to step {history[-1]['step']}: loss {history[-1]['loss']:.4f}; workdir {workdir}")


def _plan(argv: list[str]) -> None:
    """Per-device memory of the config's train step on its mesh, from XLA's compiled memory analysis."""
    from diffemb_jax import parallel
    from diffemb_jax.training.trainer import Trainer

    config, workdir = _training_flags("plan", argv)
    parallel.initialize_distributed()
    plan = Trainer(config, workdir).memory_plan()
    print(f"per-device memory of one train step, mesh {dict(config.mesh)} "
          f"(global batch {config.train.global_batch_size}):")
    print("| part | MiB |\n|---|---:|")
    for part, size in plan.items():
        print(f"| {part} | {size / 2**20:.1f} |")


def _demo(args) -> None:
    from diffemb_jax import demo

    demo.run()


def _bench(args) -> None:
    from diffemb_jax import bench

    bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    from diffemb_jax.bench import SHAPES
    from diffemb_jax.embedding.pooling import POOLING_MODES
    from diffemb_jax.model import ATTENTION_MODES
    from diffemb_jax.model.attention import KERNELS

    parser = argparse.ArgumentParser(prog="diffemb", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="HF model directory or .gguf file -> converted directory")
    p.add_argument("src", help="HF model directory (config.json + safetensors/.bin) or a .gguf file")
    p.add_argument("out", help="output directory (must not exist)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.set_defaults(func=_convert)

    p = sub.add_parser("export", help="model (converted, HF or .gguf), optionally with a PEFT LoRA adapter "
                       "merged in -> Hugging Face directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("model", help="converted directory, HF model directory or .gguf file")
    p.add_argument("out", help="output directory (must not exist)")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory to merge into the weights")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.set_defaults(func=_export)

    p = sub.add_parser("encode", help="embed the lines of a .txt or .jsonl file into a .npy")
    p.add_argument("--model", required=True, help="converted directory, HF model directory or .gguf file")
    p.add_argument("--input", required=True, help=".txt (one text a line) or .jsonl (field \"text\")")
    p.add_argument("--output", required=True, help="OUT.npy; row i is line i of the input")
    p.add_argument("--attention", choices=ATTENTION_MODES, default="bidirectional")
    p.add_argument("--pooling", choices=POOLING_MODES, default="mean")
    p.add_argument("--skip-instruction", action="store_true", help="pool only the tokens after the instruction")
    p.add_argument("--instruction", default=None, help="task instruction prepended to every text")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--kernel", choices=KERNELS, default="auto",
                   help="attention kernel: auto picks cudnn on GPU, splash on TPU, xla elsewhere")
    p.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                   help="shard over all devices, e.g. -1,1,1 (data parallel) or 4,1,2; default: one device")
    p.set_defaults(func=_encode)

    p = sub.add_parser("evaluate", help="retrieval metrics on a BEIR folder, or similarity correlations on pairs")
    tasks = p.add_subparsers(dest="task", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="converted directory, HF model directory or .gguf file")
    common.add_argument("--attention", choices=ATTENTION_MODES, default="bidirectional")
    common.add_argument("--pooling", choices=POOLING_MODES, default="mean")
    common.add_argument("--skip-instruction", action="store_true", help="pool only the tokens after the instruction")
    common.add_argument("--max-length", type=int, default=512)
    common.add_argument("--batch-size", type=int, default=16)
    common.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    common.add_argument("--kernel", choices=KERNELS, default="auto")
    common.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR", help="shard over all devices (as encode)")
    common.add_argument("--output", default=None, help="also write the results to this .json file")
    t = tasks.add_parser("retrieval", parents=[common], help="nDCG@10, MAP@100, Recall@100, MRR@10 on a BEIR folder")
    t.add_argument("--data", required=True, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv")
    t.add_argument("--split", default="test", help="qrels/SPLIT.tsv to score")
    t.add_argument("--query-instruction", default=None, help="task instruction put in front of every query")
    t.add_argument("--top-k", type=int, default=100, help="documents retrieved per query (the @100 metrics need 100)")
    t = tasks.add_parser("similarity", parents=[common], help="Spearman and Pearson of cosine against gold scores")
    t.add_argument("--data", required=True, help=".tsv (header with sentence1, sentence2, score) or .jsonl")
    t.add_argument("--instruction", default=None, help="task instruction put in front of both sentences")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("demo", help="convert the bundled SmolLM2-135M and embed a few sentences")
    p.set_defaults(func=_demo)

    p = sub.add_parser("bench", help="speed and memory against the PyTorch reference")
    p.add_argument("what", choices=("encode", "train"))
    p.add_argument("--queries", type=int, default=8, help="train: queries per step, each with a positive and a "
                   "hard negative (--batch-size, --texts and --max-length are encode's)")
    p.add_argument("--query-length", type=int, default=32, help="train: tokens per query, padded")
    p.add_argument("--doc-length", type=int, default=128, help="train: tokens per document, padded")
    p.add_argument("--lora-rank", type=int, default=16, help="train: LoRA rank (alpha = 2 x rank)")
    p.add_argument("--remat", choices=("none", "full"), default="none", help="train: gradient checkpointing")
    p.add_argument("--warmup-steps", type=int, default=1, help="train: untimed steps first (JAX: compilation)")
    p.add_argument("--steps", type=int, default=5, help="train: timed steps")
    p.add_argument("--model", default=None, help="model to bench (default: the bundled SmolLM2-135M)")
    p.add_argument("--shape", default=None, choices=tuple(SHAPES),
                   help="bench this model shape at random weights instead (on CPU only the small ones are practical)")
    p.add_argument("--texts", type=int, default=64, help="number of texts")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s at --dtype, for MFU (default: known GPUs only)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["train"], ["plan"]):
        from diffemb_jax.training.trainer import TrainingDiverged

        work = {"train": _train, "plan": _plan}[argv[0]]
        return _run(argv[0], lambda: work(argv[1:]), (TrainingDiverged,))
    args = build_parser().parse_args(argv)
    return _run(args.command, lambda: args.func(args))


def _run(command: str, work, more_errors: tuple = ()) -> int:
    """Run a command; user errors (bad input, a checkpoint or config that does not fit) exit 2 with
    their message instead of a traceback. CheckpointError, InputError, UnsupportedConfigError and the
    data pipeline's BadRowError are ValueErrors."""
    try:
        work()
    except (ValueError, FileExistsError, FileNotFoundError, *more_errors) as e:
        print(f"diffemb {command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
