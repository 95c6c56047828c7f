"""Embedder and pooling against pooling done in numpy on transformers' hidden states (llm2vec's
formulas, on llm2vec's left-padded layout), and the prompt / embed-mask rules of the recipe."""

import logging

import numpy as np
import pytest
import tokenizers

import tiny
from diffemb_jax.embedding import SEPARATOR, Embedder, tokenize, with_instruction
from diffemb_jax.embedding.embedder import plan_batches

TEXTS = ["the cat plays music", "a dog runs", "the big red car was fast and the small blue car was slow",
         "she reads", "we write one two three four five six seven"]
INSTRUCTION = "find the text"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    oracle = tiny.oracle_model("llama")
    directory = tiny.write_checkpoint("llama", tmp_path_factory.mktemp("llama") / "hf", model=oracle)
    return oracle, directory


def _llm2vec_pool(reps, seq_lengths, mode):
    """llm2vec's pooling: reps left-padded, the pooled tokens are the last seq_lengths[i]."""
    out = []
    for i, n in enumerate(seq_lengths):
        tail = reps[i, reps.shape[1] - n:]
        if mode == "mean":
            out.append(tail.mean(0))
        elif mode == "weighted_mean":
            w = np.arange(1, n + 1, dtype=np.float64)
            out.append((tail * (w / w.sum())[:, None]).sum(0))
        else:
            out.append(reps[i, -1])
    out = np.stack(out)
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


@pytest.mark.parametrize("mode", ["mean", "weighted_mean", "last_token"])
@pytest.mark.parametrize("skip_instruction", [False, True])
def test_encode_equals_numpy_pooling_of_transformers(llama, mode, skip_instruction):
    oracle, directory = llama
    embedder = Embedder.from_pretrained(directory, pooling=mode, skip_instruction=skip_instruction,
                                        batch_size=2, max_length=64)
    ours = embedder.encode(TEXTS, instruction=INSTRUCTION, progress=False)

    tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    full = [tok.encode(f"{INSTRUCTION}; {t}").ids for t in TEXTS]
    tails = [len(tok.encode(t, add_special_tokens=False).ids) for t in TEXTS]
    width = max(map(len, full))
    ids = np.zeros((len(TEXTS), width), np.int64)
    mask = np.zeros((len(TEXTS), width), np.int64)
    for i, row in enumerate(full):  # left padding, as llm2vec tokenizes
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    reps = tiny.oracle_hidden(oracle, ids, mask, "bidirectional")
    lengths = tails if skip_instruction else mask.sum(-1)
    np.testing.assert_allclose(ours, _llm2vec_pool(reps, lengths, mode), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)


def test_embed_mask_counts_the_tokens_after_the_separator(llama):
    tok = tokenizers.Tokenizer.from_file(str(llama[1] / "tokenizer.json"))
    tokens = tokenize(tok, [with_instruction("a dog runs", "find the cat"), f"{SEPARATOR}the cat", "no separator here"], 64)
    assert with_instruction("a dog runs", "find the cat") == f"find the cat; {SEPARATOR}a dog runs"
    assert [len(r) for r in tokens.ids] == [1 + 4 + 3, 1 + 2, 1 + 3]  # <s>, instruction (';' too), text
    assert tokens.embed_lengths == [3, 2, 3]


@pytest.mark.parametrize("batch_size,max_batch_tokens", [(2, None), (4, 64)])
def test_order_restored_and_shapes_bounded(llama, batch_size, max_batch_tokens):
    embedder = Embedder.from_pretrained(llama[1], batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                                        max_length=64)
    texts = TEXTS * 3 + [" ".join(TEXTS * 2)]  # the last one is past the 32-token bucket
    shapes = []
    dispatch = embedder._dispatch
    embedder._dispatch = lambda batch: shapes.append(batch[0].shape) or dispatch(batch)
    together = embedder.encode(texts, progress=False)
    shapes, alone_shapes = [], shapes
    alone = np.concatenate([embedder.encode([t], progress=False) for t in texts])
    embedder._dispatch = dispatch
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert {rows for rows, _ in shapes} == {1}  # a one-text call computes one row, not a batch of padding
    # per bucket: full batches, and the last batch's fewer power-of-two rows
    assert embedder._embed._cache_size() <= len(embedder.buckets) * (1 + int(np.log2(batch_size)))
    shapes = alone_shapes
    assert shapes[0][1] == 64 and {length for _, length in shapes[1:]} == {32}
    if max_batch_tokens is None:
        assert {rows for rows, _ in shapes} == {batch_size}
    else:  # one row at 64 tokens, two at 32, and the fifteenth 32-token text alone
        assert shapes == [(1, 64)] + [(2, 32)] * 7 + [(1, 32)]


def test_batch_plan_keeps_to_the_token_budget():
    rng = np.random.RandomState(0)
    lengths = list(rng.randint(1, 300, 200))
    buckets = [32, 64, 128, 256, 300]
    for multiple in (1, 2):
        plan = plan_batches(lengths, buckets, 8, 256, multiple)
        assert sorted(i for indices, _, _ in plan for i in indices) == list(range(200))
        assert [lengths[i] for indices, _, _ in plan for i in indices] == sorted(lengths, reverse=True)
        for indices, length, rows in plan:
            assert max(lengths[i] for i in indices) <= length == min(b for b in buckets if b >= lengths[indices[0]])
            assert len(indices) <= rows <= 8 and rows % multiple == 0
            assert rows * length <= 256 or rows == multiple
        full = {32: 8, 64: 4, 128: 2, 256: 1 * multiple, 300: multiple}
        assert [rows for _, _, rows in plan[:-1]] == [full[length] for _, length, _ in plan[:-1]]
        (last, length, rows), = plan[-1:]  # short of its bucket's rows: padded to multiple x 2^k only
        assert len(last) < full[length] and rows <= full[length]
        assert rows // multiple & (rows // multiple - 1) == 0 and (rows < 2 * len(last) or rows == multiple)
    assert all(rows == 8 for _, _, rows in plan_batches(lengths, buckets, 8, None)[:-1])
    assert plan_batches([5] * 9, [32], 8, None)[-1][2] == 1
    assert plan_batches([5] * 11, [32], 8, None, 2)[-1][2] == 4  # three texts on two shards: two rows each


def test_truncation_warns_once_with_count(llama, caplog):
    embedder = Embedder.from_pretrained(llama[1], max_length=4)
    with caplog.at_level(logging.WARNING):
        vectors = embedder.encode(TEXTS, progress=False)
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert warnings == ["3 of 5 texts were longer than max_length=4 tokens and were truncated"]
    assert vectors.shape == (5, 32)


def test_text_without_tokens_is_an_error(tmp_path):
    directory = tiny.write_checkpoint("qwen2", tmp_path / "hf")  # this tokenizer adds no BOS
    embedder = Embedder.from_pretrained(directory)
    with pytest.raises(ValueError, match=r"positions \[1\] give no tokens"):
        embedder.encode(["the cat", ""], progress=False)
