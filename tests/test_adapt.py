"""`diffemb adapt`: the masked-token objectives against PyTorch written from the papers' formulas, the
corruption's rates, the mask token, the text rows, and resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import torch.nn.functional as F
from flax import nnx
from flax.traverse_util import flatten_dict

import tiny
from diffemb_jax import cli
from diffemb_jax.checkpoints import load_model
from diffemb_jax.checkpoints.checkpoint import model_config
from diffemb_jax.model import ForwardOptions
from diffemb_jax.model.vocab import with_vocab_rows
from diffemb_jax.training import text_blocks
from diffemb_jax.training.adapt import MODEL_DIR, with_mask_token
from diffemb_jax.training.masked_lm import corrupt, masked_lm_loss

CONFIG = Path(__file__).parent.parent / "configs" / "adapt.py"


def _text_file(path: Path, docs: int = 48, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": " ".join(rng.choice(tiny.WORDS) for _ in range(rng.randint(3, 50)))}) + "\n")
    return path


def _oracle_loss(model, noisy, ids, lengths, masked, p, objective):
    """The loss as LLaDA's guidelines and llm2vec's MNTP define it, on transformers' logits: logits
    at position i - 1 score token i; masked-diffusion: sum of CE / p over masked tokens, divided
    by the tokens that could be predicted; MNTP: mean CE over masked tokens."""
    b, l = noisy.shape
    real = torch.arange(l)[None, :] < torch.as_tensor(lengths)[:, None]
    mask = (real[:, None, :, None] & real[:, None, None, :])  # bidirectional within the text
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(np.array(noisy, np.int64)), attention_mask=mask,
                       position_ids=torch.arange(l)[None].expand(b, -1)).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), torch.as_tensor(np.array(ids, np.int64))[:, 1:].reshape(-1),
                         reduction="none").reshape(b, l - 1)
    m = torch.as_tensor(np.array(masked))[:, 1:]
    if objective == "diffusion":
        predictable = real[:, 1:].sum()  # a text's first token has nothing before it
        return float((ce[m] / torch.as_tensor(np.array(p))[:, None].expand(-1, l - 1)[m]).sum() / predictable)
    return float(ce[m].mean())


@pytest.mark.parametrize("objective", ["diffusion", "mntp"])
def test_objectives_equal_pytorch_from_the_formulas(tmp_path, objective):
    oracle = tiny.oracle_model("qwen2")
    model, _ = load_model(tiny.write_checkpoint("qwen2", tmp_path / "m", model=oracle))
    lengths = np.array([24, 17, 9, 24])
    ids = np.random.default_rng(0).integers(3, 96, (4, 24)).astype(np.int32)
    segments = (np.arange(24)[None, :] < lengths[:, None]).astype(np.int32)
    ids = ids * segments
    noisy, masked, weight = corrupt(jax.random.key(3), jnp.asarray(ids), jnp.asarray(segments), objective=objective,
                                    mask_id=96, vocab=97)
    assert int(masked.sum()) > 0
    logits = model.logits(model(noisy, jnp.asarray(segments), ForwardOptions(attention="bidirectional")))
    ours = masked_lm_loss(logits, jnp.asarray(ids), masked, weight, jnp.asarray(segments), objective=objective)
    expected = _oracle_loss(oracle, np.asarray(noisy), ids, lengths, np.asarray(masked), 1 / np.asarray(weight),
                            objective)
    np.testing.assert_allclose(float(ours["loss"]), expected, rtol=2e-5)


def test_corruption_rates_follow_the_objectives():
    b, l = 512, 256
    ids = jnp.full((b, l), 5, jnp.int32)
    segments = jnp.ones((b, l), jnp.int32).at[:, 200:].set(0)  # pads are never masked
    noisy, masked, weight = corrupt(jax.random.key(0), ids, segments, objective="diffusion", mask_id=96, vocab=97)
    masked, p = np.asarray(masked), 1 / np.asarray(weight)
    assert not masked[:, 0].any() and not masked[:, 200:].any()
    assert 1e-3 <= p.min() and p.max() <= 1.0 and abs(p.mean() - 0.5) < 0.05  # t ~ U(0, 1)
    np.testing.assert_allclose(masked[:, 1:200].mean(axis=1), p, atol=0.15)  # each row its own rate
    assert (np.asarray(noisy)[masked] == 96).all() and (np.asarray(noisy)[~masked] == 5).all()

    noisy, masked, weight = corrupt(jax.random.key(1), ids, segments, objective="mntp", mask_id=96, vocab=97, ratio=0.2)
    noisy, masked = np.asarray(noisy), np.asarray(masked)
    assert abs(masked[:, 1:200].mean() - 0.2) < 0.01 and (np.asarray(weight) == 1).all()
    chosen = noisy[masked]
    assert abs((chosen == 96).mean() - 0.8) < 0.01  # 80% the mask token,
    assert abs(((chosen != 96) & (chosen != 5)).mean() - 0.1 * 95 / 97) < 0.01  # 10% a random one (not itself),
    assert (noisy[~masked] == 5).all()  # the rest as they were


def test_a_texts_first_token_is_never_masked():
    segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 3, 3, 0, 0]] * 2000)
    _, masked, _ = corrupt(jax.random.key(0), jnp.ones_like(segments), segments, objective="mntp", mask_id=0, vocab=9,
                           ratio=0.5)
    rate = np.asarray(masked).mean(axis=0)
    assert (rate[[0, 3, 6, 8, 9]] == 0).all() and (rate[[1, 2, 4, 5, 7]] > 0.4).all()


def test_mask_token_is_a_new_row_at_the_mean(tmp_path):
    words = 3 + len(tiny.WORDS)  # the tiny tokenizer's size: the model has no spare row
    model, tok = load_model(tiny.write_checkpoint("qwen2", tmp_path / "m", vocab_size=words))
    before = np.asarray(model.embed.embedding[...])
    head = np.asarray(model.lm_head.kernel[...])
    grown, mask_id = with_mask_token(model, tok, "<|mask|>")
    assert mask_id == words and grown.cfg.vocab_size == words + 1 and grown.cfg.mask_token_id == words
    assert tok.encode("the <|mask|> is", add_special_tokens=False).ids == [
        tok.token_to_id("the"), words, tok.token_to_id("is")]
    table = np.asarray(grown.embed.embedding[...])
    np.testing.assert_array_equal(table[:words], before)
    np.testing.assert_allclose(table[words], before.mean(axis=0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grown.lm_head.kernel[...])[:, words], head.mean(axis=1), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="shrink"):
        with_vocab_rows(model, 10)


def test_mask_token_takes_a_spare_row_where_there_is_one(tmp_path):
    model, tok = load_model(tiny.write_checkpoint("qwen2", tmp_path / "m"))  # 97 rows, fewer tokens
    grown, mask_id = with_mask_token(model, tok, "<|mask|>")
    assert mask_id == 3 + len(tiny.WORDS) < 97 and grown.cfg.vocab_size == 97 and grown.cfg.mask_token_id == mask_id
    np.testing.assert_array_equal(np.asarray(grown.embed.embedding[...]), np.asarray(model.embed.embedding[...]))


def test_a_diffusion_models_own_mask_token_is_kept(tmp_path):
    model, tok = load_model(tiny.write_checkpoint("Dream", tmp_path / "m"))
    same, mask_id = with_mask_token(model, tok, "<|mask|>")
    assert mask_id == 96 and same is model and tok.token_to_id("<|mask|>") is None


def test_text_rows_hold_every_piece_once_in_its_own_segment(tmp_path):
    tok = tokenizers.Tokenizer.from_file(str(tiny.write_tokenizer(tmp_path)))
    data = _text_file(tmp_path / "text.jsonl", docs=30)
    folder = text_blocks.build_blocks([data], tok, 16, tmp_path / "cache", progress=False)
    ids, segments = np.load(folder / text_blocks.IDS), np.load(folder / text_blocks.SEGMENTS)
    pieces = sorted(tuple(ids[r][segments[r] == s]) for r in range(len(ids)) for s in range(1, segments[r].max() + 1))
    expected = []
    for line in data.read_text().splitlines():
        doc = tok.encode(json.loads(line)["text"], add_special_tokens=False).ids
        expected += [tuple(doc[i:i + 16]) for i in range(0, len(doc), 16) if len(doc) - i >= 2]
    assert pieces == sorted(expected)
    assert text_blocks.build_blocks([data], tok, 16, tmp_path / "cache", progress=False) == folder  # reused
    batches = text_blocks.BlockBatches(folder, global_batch_size=4, seed=0)
    epoch = [tuple(map(tuple, batches[s]["input_ids"])) for s in range(len(ids) // 4)]
    assert len(set(r for b in epoch for r in b)) == len(ids) // 4 * 4  # no row twice in an epoch


def test_a_bad_text_line_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the a"}\n{"txt": "oops"}\n')
    tok = tokenizers.Tokenizer.from_file(str(tiny.write_tokenizer(tmp_path)))
    with pytest.raises(text_blocks.BadTextError, match=r"bad.jsonl:2: .*\"text\""):
        text_blocks.build_blocks([bad], tok, 16, tmp_path / "cache", progress=False)


def _adapt_args(model, data, workdir, *extra):
    return ["adapt", f"--config={CONFIG}:diffusion,tiny", f"--workdir={workdir}", f"--config.model.path={model}",
            f"--config.data.files={data}", "--config.train.steps=4", "--config.train.checkpoint_every=2", *extra]


def _params(path: Path) -> dict:
    model, _ = load_model(path)
    return {"/".join(map(str, k)): np.asarray(v) for k, v in flatten_dict(nnx.state(model).to_pure_dict()).items()}


def test_resume_after_an_interruption_gives_the_same_adapted_model(tmp_path, monkeypatch):
    """LoRA with dropout: the masks, the data and the optimizer state all have to come back."""
    model = tiny.write_checkpoint("qwen2", tmp_path / "m")
    data = _text_file(tmp_path / "text.jsonl")
    extra = ("--config.lora.rank=4", "--config.lora.dropout=0.1")
    assert cli.main(_adapt_args(model, data, tmp_path / "straight", *extra)) == 0

    original = text_blocks.BlockBatches.__getitem__

    def fails_at_step_3(self, step):
        if step == 2:
            raise OSError("the machine went away")
        return original(self, step)

    monkeypatch.setattr(text_blocks.BlockBatches, "__getitem__", fails_at_step_3)
    with pytest.raises(OSError):
        cli.main(_adapt_args(model, data, tmp_path / "resumed", *extra))
    assert not (tmp_path / "resumed" / MODEL_DIR).exists()
    monkeypatch.setattr(text_blocks.BlockBatches, "__getitem__", original)
    assert cli.main(_adapt_args(model, data, tmp_path / "resumed", *extra)) == 0

    losses = [[json.loads(line).get("loss") for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("straight", "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    a, b = _params(tmp_path / "straight" / MODEL_DIR), _params(tmp_path / "resumed" / MODEL_DIR)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    base = _params(model)
    changed = [k for k in base if k in a and a[k].shape == base[k].shape and not np.array_equal(a[k], base[k])]
    assert changed  # the adaptation trained something
    assert model_config(tmp_path / "straight" / MODEL_DIR).mask_token_id == 3 + len(tiny.WORDS)


def test_the_adapted_model_encodes_and_held_out_accuracy_is_logged(tmp_path):
    model = tiny.write_checkpoint("llama", tmp_path / "m")
    data, held_out = _text_file(tmp_path / "text.jsonl"), _text_file(tmp_path / "eval.jsonl", seed=1)
    assert cli.main(_adapt_args(model, data, tmp_path / "w", f"--config.data.eval_files={held_out}",
                                "--config.objective.kind=mntp")) == 0
    records = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 4] and all(0 <= r["eval_accuracy"] <= 1 for r in evals)
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat is here\nwe are not\n")
    out = tmp_path / "v.npy"
    assert cli.main(["encode", "--model", str(tmp_path / "w" / MODEL_DIR), "--input", str(texts),
                     "--output", str(out)]) == 0
    vectors = np.load(out)
    assert vectors.shape == (2, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_bad_objective_is_an_error_before_loading(tmp_path, capsys):
    data = _text_file(tmp_path / "text.jsonl")
    rc = cli.main(_adapt_args(tmp_path / "no-model", data, tmp_path / "w", "--config.objective.kind=bert"))
    assert rc == 2 and "objective.kind must be one of" in capsys.readouterr().err
