"""`diffemb`: convert | encode | demo | bench."""

from __future__ import annotations

import argparse
import logging
import sys


def _convert(args) -> None:
    from conversion import convert

    out = convert(args.src, args.out, dtype=args.dtype)
    print(f"converted {args.src} -> {out}")


def _encode(args) -> None:
    from diffemb_jax.embedding import Embedder
    from diffemb_jax.embedding.files import check_output_path, read_texts, save_npy_atomic

    output = check_output_path(args.output)
    texts = read_texts(args.input)
    embedder = Embedder.from_pretrained(
        args.model, attention=args.attention, dtype=args.dtype, kernel=args.kernel, pooling=args.pooling,
        skip_instruction=args.skip_instruction, max_length=args.max_length, batch_size=args.batch_size)
    vectors = embedder.encode(texts, instruction=args.instruction)
    save_npy_atomic(output, vectors)
    print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} float32 embeddings to {output}")


def _demo(args) -> None:
    from diffemb_jax import demo

    demo.run()


def _bench(args) -> None:
    from diffemb_jax import bench

    bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    from diffemb_jax.embedding.pooling import POOLING_MODES
    from diffemb_jax.model import ATTENTION_MODES

    parser = argparse.ArgumentParser(prog="diffemb", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="HF model directory or .gguf file -> converted directory")
    p.add_argument("src", help="HF model directory (config.json + safetensors/.bin) or a .gguf file")
    p.add_argument("out", help="output directory (must not exist)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.set_defaults(func=_convert)

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
    p.add_argument("--kernel", choices=("xla", "cudnn"), default="xla", help="attention kernel (cudnn: GPU)")
    p.set_defaults(func=_encode)

    p = sub.add_parser("demo", help="convert the bundled SmolLM2-135M and embed a few sentences")
    p.set_defaults(func=_demo)

    p = sub.add_parser("bench", help="speed and memory against the PyTorch reference")
    p.add_argument("what", choices=("encode",))
    p.add_argument("--model", default=None, help="model to bench (default: the bundled SmolLM2-135M)")
    p.add_argument("--texts", type=int, default=64, help="number of texts")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    from conversion import CheckpointError
    from diffemb_jax.embedding.files import InputError
    from diffemb_jax.model import UnsupportedConfigError

    try:
        args.func(args)
    except (CheckpointError, InputError, UnsupportedConfigError, FileExistsError, FileNotFoundError,
            ValueError) as e:
        print(f"diffemb {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
