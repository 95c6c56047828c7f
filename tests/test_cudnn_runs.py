"""cuDNN's packed layout as the cudnn kernel fills it (model/attention.py segment_runs): CI has no GPU,
so what is checked here is what the kernel is handed. Each row's runs against an oracle written
here (itertools.groupby), then the runs through JAX's own hand-over to cuDNN (_fix_seqlen_offsets:
global token offsets, the row's runs moved to the left), and attention computed the way cuDNN's
documentation defines the packed layout (each run a sequence of its own, every other token masked),
against each text's attention alone, both modes. The lowering itself: test_accelerator_lowering."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.cudnn import fused_attention_stablehlo as cudnn

from diffemb_jax.batching import pack_batch, pack_rows, texts_per_row
from diffemb_jax.model.attention import runs_cheaper, segment_runs

HEADS, DIM = 2, 8


def _packed_rows(lengths, length, extra_rows=1):
    """Texts of `lengths` tokens packed first fit decreasing into rows of `length` (pack_rows, as the
    trainer and the Embedder pack), plus `extra_rows` rows of pads (padded_rows' padding)."""
    rows = pack_rows(lengths, length)
    ids = [list(range(1, n + 1)) for n in lengths]
    _, segments, _ = pack_batch(ids, lengths, rows, length, len(rows) + extra_rows)
    return rows, segments


def _oracle_runs(row):
    return [len(list(group)) for _, group in itertools.groupby(row.tolist())]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_rows_runs_are_its_texts_then_its_pads(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 24, size=int(rng.integers(3, 20))).tolist()
    _, segments = _packed_rows(lengths, 32)
    most = texts_per_row(segments) + 1
    assert most - 1 >= max(len(_oracle_runs(r)) - (r[-1] == 0) for r in segments)
    run_lengths, starts = map(np.asarray, segment_runs(jnp.asarray(segments), most))
    assert run_lengths.shape == (len(segments), most) and starts.shape == (len(segments), most + 1)
    for row, got, at in zip(segments, run_lengths, starts):
        expected = _oracle_runs(row)
        assert got[: len(expected)].tolist() == expected and (got[len(expected):] == -1).all()
        assert at[: len(expected)].tolist() == np.cumsum([0] + expected[:-1]).tolist()
        assert (at[len(expected):] == -1).all()


def _attention(q, k, v, allowed):
    """Softmax attention, float64, over the keys `allowed` [Lq, Lk] lets each query see."""
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(allowed[None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", weights, v)


@pytest.mark.parametrize("causal", [False, True])
def test_the_runs_as_cudnn_reads_them_give_each_text_its_attention_alone(causal):
    lengths = [7, 3, 12, 5, 9, 2, 4]
    length = 16
    rows, segments = _packed_rows(lengths, length)
    b = len(segments)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, length, HEADS, DIM)) for _ in range(3))
    most = texts_per_row(segments) + 1
    run_lengths, starts = segment_runs(jnp.asarray(segments), most)
    shape = jnp.zeros((b, length, HEADS, DIM))
    seqlen, _, offsets, _ = cudnn._fix_seqlen_offsets(run_lengths, run_lengths, starts, starts, shape, shape)
    seqlen, offsets = np.asarray(seqlen).reshape(-1), np.asarray(offsets).reshape(-1) // (HEADS * DIM)  # elements

    flat = [x.reshape(b * length, HEADS, DIM) for x in (q, k, v)]
    out = np.full((b * length, HEADS, DIM), np.nan)
    covered = np.zeros(b * length, int)
    for start, n in zip(offsets, seqlen):  # cuDNN's sequences: every run, rows one after another
        if n <= 0:
            continue
        assert start // length == (start + n - 1) // length  # a run stays in its row
        allowed = np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool)
        span = slice(start, start + n)
        out[span] = _attention(flat[0][span], flat[1][span], flat[2][span], allowed)
        covered[span] += 1
    assert (covered == 1).all()  # every token, pads included, in exactly one run: all outputs defined
    out = out.reshape(b, length, HEADS, DIM)

    for r, texts in enumerate(rows):
        at = 0
        for i in texts:
            n = lengths[i]
            alone = _attention(q[r, at:at + n], k[r, at:at + n], v[r, at:at + n],
                               np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool))
            np.testing.assert_allclose(out[r, at:at + n], alone, atol=1e-12)
            at += n


def test_texts_per_row_is_the_most_a_row_holds_rounded_up_to_a_power_of_two():
    for lengths, length in (([3] * 10, 32), ([30, 2, 1], 32), ([5, 5, 5], 8)):
        rows, segments = _packed_rows(lengths, length)
        most = max(map(len, rows))
        bound = texts_per_row(segments)
        assert bound >= most and bound < 2 * max(most, 2) and bound & (bound - 1) == 0


def test_long_rows_take_runs_and_short_crowded_rows_the_mask():
    """Dream-7B's 28 heads: a 4096-token row of up to 63 texts (64 runs) takes runs (its float32
    statistics [runs, 28, 4096] no bigger than the bfloat16 [4096, 4096] mask); 64 texts in 512 tokens
    take the mask."""
    assert runs_cheaper(64, 28, 4096) and not runs_cheaper(74, 28, 4096)
    assert not runs_cheaper(65, 28, 512)
