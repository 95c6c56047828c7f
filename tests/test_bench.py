"""`diffemb bench encode` end to end on a tiny random LLaMA: both frameworks run and agree."""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402
from diffemb_jax import cli  # noqa: E402


def _write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A small BPE (lower-case letters and digits, then merges) that fits the tiny model's vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"], show_progress=False,
                                  initial_alphabet=list(string.ascii_lowercase + string.digits + ".,()"))
    tok.train_from_iterator(["Return the sum of the arguments.", "Open the file and read its lines.",
                             "Create a new thread that runs the target function."], trainer)
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(directory / "tokenizer.json"))


def test_bench_encode_tiny_model(tmp_path):
    model_dir = tiny.write_checkpoint("llama", tmp_path / "llama")
    _write_tokenizer(model_dir, vocab_size=97)
    out = tmp_path / "bench.json"

    rc = cli.main(["bench", "encode", "--model", str(model_dir), "--texts", "8", "--batch-size", "4",
                   "--max-length", "32", "--json", str(out)])

    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"jax", "torch"}
    for result in report["results"].values():
        assert result["texts"] == 8 and result["tokens"] == report["settings"]["tokens"] > 0
        assert result["tokens_per_s"] > 0 and result["peak_rss_mb"] > 0
    assert report["max_abs_diff_first"] < 1e-3
