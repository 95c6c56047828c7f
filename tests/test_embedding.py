"""Embedder and pooling against pooling done in numpy on transformers' hidden states (llm2vec's
formulas, on llm2vec's left-padded layout), and the prompt / embed-mask rules of the recipe."""

import logging

import numpy as np
import pytest
import tokenizers

import tiny
from diffemb_jax.embedding import SEPARATOR, Embedder, tokenize, with_instruction
from diffemb_jax.batching import plan_batches

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
@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
@pytest.mark.parametrize("packed", [True, False])
def test_encode_equals_numpy_pooling_of_transformers(llama, mode, skip_instruction, attention, packed):
    """Packed (several texts a row, each attending within itself) or one text a row: each text's
    vector is the one transformers gives it alone."""
    oracle, directory = llama
    embedder = Embedder.from_pretrained(directory, pooling=mode, skip_instruction=skip_instruction, attention=attention,
                                        batch_size=2, max_length=64, pack_length=512 if packed else 0)
    rows = []
    dispatch = embedder._dispatch
    embedder._dispatch = lambda batch, texts_per_row: rows.extend(batch[1].max(-1)) or dispatch(batch, texts_per_row)
    ours = embedder.encode(TEXTS, instruction=INSTRUCTION, progress=False)
    assert max(rows) == (3 if packed else 1)  # packed: rows of 32 tokens hold 18 + 14 and 9 + 8 + 7

    tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    full = [tok.encode(f"{INSTRUCTION}; {t}").ids for t in TEXTS]
    tails = [len(tok.encode(t, add_special_tokens=False).ids) for t in TEXTS]
    width = max(map(len, full))
    ids = np.zeros((len(TEXTS), width), np.int64)
    mask = np.zeros((len(TEXTS), width), np.int64)
    for i, row in enumerate(full):  # left padding, as llm2vec tokenizes
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    reps = tiny.oracle_hidden(oracle, ids, mask, attention)
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
@pytest.mark.parametrize("packed", [True, False])
def test_order_restored_and_shapes_bounded(llama, batch_size, max_batch_tokens, packed):
    embedder = Embedder.from_pretrained(llama[1], batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                                        max_length=64, pack_length=512 if packed else 0)
    texts = TEXTS * 3 + [" ".join(TEXTS * 2)]  # the last one is past the 32-token bucket
    shapes = []
    compiled_before = embedder._embed._cache_size()  # the program is shared by Embedders of one architecture
    dispatch = embedder._dispatch
    embedder._dispatch = lambda batch, texts_per_row: shapes.append(batch[0].shape) or dispatch(batch, texts_per_row)
    together = embedder.encode(texts, progress=False)
    shapes, together_shapes = [], shapes
    alone = np.concatenate([embedder.encode([t], progress=False) for t in texts])
    embedder._dispatch = dispatch
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert {rows for rows, _ in shapes} == {1}  # a one-text call computes one row, not a batch of padding
    # per bucket: full batches, and the last batch's fewer power-of-two rows
    assert embedder._embed._cache_size() - compiled_before <= len(embedder.buckets) * (1 + int(np.log2(batch_size)))
    shapes = together_shapes
    if packed:  # the long text fills a 64-token row; the 15 short ones (111 tokens) take 128 more
        assert sum(rows * length for rows, length in shapes) == 64 + 128
        return
    assert shapes[0][1] == 64 and {length for _, length in shapes[1:]} == {32}
    if max_batch_tokens is None:
        assert {rows for rows, _ in shapes} == {batch_size}
    else:  # one row at 64 tokens, two at 32, and the fifteenth 32-token text alone
        assert shapes == [(1, 64)] + [(2, 32)] * 7 + [(1, 32)]


@pytest.mark.parametrize("pack_length", [0, 128, 300])
def test_batch_plan_keeps_to_the_token_budget(pack_length):
    rng = np.random.RandomState(0)
    lengths = list(rng.randint(1, 300, 200))
    buckets = [32, 64, 128, 256, 300]
    for multiple in (1, 2):
        plan = plan_batches(lengths, buckets, 8, 256, multiple, pack_length)
        placed = [i for texts, _, _ in plan for row in texts for i in row]
        assert sorted(placed) == list(range(200))
        if not pack_length:  # one text a row: in order of length (first fit takes the short ones early)
            assert [lengths[i] for i in placed] == sorted(lengths, reverse=True)
        packable = [n for n in lengths if min(b for b in buckets if b >= n) <= pack_length]
        for texts, length, rows in plan:
            first = texts[0][0]
            assert max(lengths[i] for row in texts for i in row) == lengths[first]  # longest first
            assert length == min(b for b in buckets if b >= lengths[first])
            assert length <= pack_length or {len(row) for row in texts} == {1}
            assert all(sum(lengths[i] for i in row) <= length for row in texts)
            assert max(map(len, texts)) <= min(64, length)
            assert len(texts) <= rows <= 8 and rows % multiple == 0
            assert rows * length <= 256 or rows == multiple
        full = {32: 8, 64: 4, 128: 2, 256: 1 * multiple, 300: multiple}
        for kind in ([b for b in plan if b[1] > pack_length], [b for b in plan if b[1] <= pack_length]):
            assert all(len(texts) == rows == full[length] for texts, length, rows in kind[:-1])
            for last, length, rows in kind[-1:]:  # may be short of full rows: multiple x (2^k or 3 x 2^k) only
                assert len(last) <= rows <= full[length]
                size = rows // multiple
                assert size & (size - 1) == 0 or (size % 3 == 0 and (size // 3) & (size // 3 - 1) == 0)
                assert rows < 1.5 * len(last) + multiple or rows == full[length]
    unbudgeted = plan_batches(lengths, buckets, 8, None, pack_length=pack_length)
    assert [rows for _, _, rows in unbudgeted].count(8) >= len(unbudgeted) - 2
    if pack_length:  # first fit decreasing pads little: under 10% of the tokens (one text a row: 32%)
        computed = sum(len(texts) * length for texts, length, _ in unbudgeted if length <= pack_length)
        assert computed - sum(packable) < 0.1 * sum(packable)
    assert plan_batches([5] * 9, [32], 8, None, pack_length=0)[-1][2] == 1
    assert plan_batches([5] * 11, [32], 8, None, 2, 0)[-1][2] == 4  # three texts left, two shards: four rows
    (rows, length, padded), = plan_batches([5] * 11, [32], 8, None, 2, 32)
    assert sorted(map(len, rows)) == [5, 6] and sorted(sum(rows, [])) == list(range(11)) and (length, padded) == (32, 2)


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
