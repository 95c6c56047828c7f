"""Pooling and the contrastive loss against golden values made by llm2vec's own code
(tests/goldens/make_llm2vec_goldens.py, run in its own environment: llm2vec needs transformers<=4.44.2)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffemb_jax.embedding.pooling import pool
from diffemb_jax.training.loss import in_batch_info_nce, per_query_negatives_loss

GOLDENS = np.load(Path(__file__).parent / "goldens" / "llm2vec.npz")


@pytest.mark.parametrize("mode", ["mean", "weighted_mean", "last_token"])
@pytest.mark.parametrize("skip", [False, True])
def test_pooling_equals_llm2vec(mode, skip):
    got = pool(jnp.asarray(GOLDENS["pool_reps"]), jnp.asarray(GOLDENS["pool_attention_mask"]),
               jnp.asarray(GOLDENS["pool_embed_mask"]), mode, skip_instruction=skip)
    np.testing.assert_allclose(np.asarray(got), GOLDENS[f"pool_{mode}_skip{skip}"], atol=1e-6)


def _packed_goldens(rows: list[list[int]], length: int):
    """The golden texts packed: each golden row's real tokens, rows[r] the golden rows (numbered as
    texts from 1) laid one after another in row r, in that order; (hidden, segments, embed_mask)."""
    reps, real, embed = GOLDENS["pool_reps"], GOLDENS["pool_attention_mask"] == 1, GOLDENS["pool_embed_mask"]
    hidden = np.zeros((len(rows), length, reps.shape[-1]), np.float32)
    segments, embed_mask = np.zeros((len(rows), length), np.int32), np.zeros((len(rows), length), np.int32)
    for r, texts in enumerate(rows):
        start = 0
        for t in texts:
            n = int(real[t].sum())
            hidden[r, start : start + n], embed_mask[r, start : start + n] = reps[t][real[t]], embed[t][real[t]]
            segments[r, start : start + n] = t + 1
            start += n
    return jnp.asarray(hidden), jnp.asarray(segments), jnp.asarray(embed_mask)


@pytest.mark.parametrize("mode", ["mean", "weighted_mean", "last_token"])
@pytest.mark.parametrize("skip", [False, True])
def test_pooling_of_packed_texts_equals_llm2vec(mode, skip):
    """The train step's pooling: texts numbered across rows, two to a row (in another order than their
    numbers), and one number (5) that no row holds."""
    hidden, segments, embed_mask = _packed_goldens([[2, 0], [3, 1]], 2 * GOLDENS["pool_reps"].shape[1])
    got = np.asarray(pool(hidden, segments, embed_mask, mode, skip_instruction=skip, texts=5))
    np.testing.assert_allclose(got[:4], GOLDENS[f"pool_{mode}_skip{skip}"], atol=1e-6)
    assert not got[4].any()


@pytest.mark.parametrize("mode", ["mean", "weighted_mean", "last_token"])
@pytest.mark.parametrize("skip", [False, True])
def test_pooling_of_texts_numbered_within_rows_equals_llm2vec(mode, skip):
    """The Embedder's packed rows: texts numbered 1..k within each row, room for three a row."""
    rows = [[2, 0], [3, 1]]
    hidden, numbers, embed_mask = _packed_goldens(rows, 2 * GOLDENS["pool_reps"].shape[1])
    segment_ids = np.zeros(numbers.shape, np.int32)
    for r, texts in enumerate(rows):
        for k, t in enumerate(texts, 1):
            segment_ids[r][np.asarray(numbers[r]) == t + 1] = k
    got = np.asarray(pool(hidden, jnp.asarray(segment_ids), embed_mask, mode, skip_instruction=skip, texts_per_row=3))
    assert got.shape == (2, 3, GOLDENS["pool_reps"].shape[-1])
    want = GOLDENS[f"pool_{mode}_skip{skip}"]
    np.testing.assert_allclose(got[:, :2].reshape(4, -1), want[[2, 0, 3, 1]], atol=1e-6)


@pytest.mark.parametrize("scale", [50, 20])
@pytest.mark.parametrize("with_negatives", [True, False])
def test_loss_and_gradients_equal_llm2vec(scale, with_negatives):
    q, pos, neg = (jnp.asarray(GOLDENS[k]) for k in ("loss_q", "loss_pos", "loss_neg"))
    suffix = f"scale{scale}" + ("" if with_negatives else "_no_neg")

    def loss(q, pos, neg):
        return in_batch_info_nce(q, pos, neg if with_negatives else None, scale=scale)["loss"]

    value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, pos, neg)
    np.testing.assert_allclose(float(value), float(GOLDENS[f"loss_{suffix}"]), rtol=1e-5)
    np.testing.assert_allclose(grads[0], GOLDENS[f"grad_q_{suffix}"], atol=1e-6)
    np.testing.assert_allclose(grads[1], GOLDENS[f"grad_pos_{suffix}"], atol=1e-6)
    if with_negatives:
        np.testing.assert_allclose(grads[2], GOLDENS[f"grad_neg_{suffix}"], atol=1e-6)


def test_accuracy_counts_positives_ranked_first():
    q = jnp.asarray([[1.0, 0], [0, 1], [1, 1]])
    pos = jnp.asarray([[1.0, 0], [0, 1], [-1, -1]])  # query 2's positive points away from it
    assert float(in_batch_info_nce(q, pos)["accuracy"]) == pytest.approx(2 / 3)


def test_per_query_negatives_is_softmax_over_own_documents():
    rng = np.random.default_rng(0)
    q, pos, negs = rng.normal(size=(4, 8)), rng.normal(size=(4, 8)), rng.normal(size=(4, 3, 8))
    scores = np.concatenate([(q * pos).sum(-1, keepdims=True), np.einsum("bd,bkd->bk", q, negs)], 1) / np.sqrt(8)
    want = np.mean(np.log(np.exp(scores).sum(-1)) - scores[:, 0])  # numpy cross-entropy, label 0
    got = per_query_negatives_loss(jnp.asarray(q), jnp.asarray(pos), jnp.asarray(negs))["loss"]
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
