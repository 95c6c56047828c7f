"""Matryoshka representation learning: the nested-dimension loss against sentence-transformers'
MatryoshkaLoss wrapping MultipleNegativesRankingLoss (loss and the gradient with respect to every
embedding), the per-query loss against a PyTorch computation of its formula, and the refusals of bad
dimensions and weights (in the step config, at trace time, and in `diffemb train`)."""

import jax
import numpy as np
import pytest
import torch

from diffemb_jax.cli import main as cli
from diffemb_jax.training.loss import SCALE
from diffemb_jax.training.step import StepConfig, contrastive_loss
from training_fixtures import tiny_setup, train_args

G, D = 4, 16  # queries, embedding size
DIMS, WEIGHTS = (8, 4, 12), (1.0, 0.5, 2.0)  # the full 16 left out, as sentence-transformers allows


def _vectors(num_negatives, seed=0):
    return np.random.RandomState(seed).randn(G * (2 + num_negatives), D).astype(np.float32)


def _ours(vectors, **kw):
    cfg = StepConfig(batch_size=G, matryoshka_dims=DIMS, matryoshka_weights=WEIGHTS, **kw)
    return jax.value_and_grad(lambda v: contrastive_loss(v, cfg)["loss"])(vectors), contrastive_loss(vectors, cfg)


class _Lookup(torch.nn.Module):
    """A SentenceTransformer module whose 'texts' are row numbers of a table of embeddings."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.as_tensor(table))

    def forward(self, features):
        return {**features, "sentence_embedding": self.table[features["input_ids"][:, 0]]}

    def get_embedding_dimension(self):
        return self.table.shape[1]


@pytest.mark.parametrize("num_negatives", [1, 2])
def test_in_batch_matryoshka_equals_sentence_transformers(num_negatives):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

    vectors = _vectors(num_negatives)
    (loss, grads), metrics = _ours(vectors, num_negatives=num_negatives)
    lookup = _Lookup(vectors)
    model = SentenceTransformer(modules=[lookup], device="cpu")
    oracle = MatryoshkaLoss(model, MultipleNegativesRankingLoss(model, scale=SCALE), list(DIMS), list(WEIGHTS))
    columns = [{"input_ids": torch.arange(c * G, (c + 1) * G)[:, None], "attention_mask": torch.ones(G, 1)}
               for c in range(2 + num_negatives)]  # anchor, positive, negative_1 ... : our rows in order
    want = oracle(columns, None)
    want.backward()
    assert float(loss) == pytest.approx(want.item(), rel=1e-5)
    np.testing.assert_allclose(np.asarray(grads), lookup.table.grad.numpy(), atol=1e-5 * float(np.abs(grads).max()))
    assert float(np.abs(grads[:, 12:]).max()) == 0.0  # components past the largest dimension get no gradient
    assert set(metrics) == {"loss", "accuracy", *(f"{k}_dim{d}" for d in DIMS for k in ("loss", "accuracy"))}
    assert float(metrics["accuracy"]) == float(metrics["accuracy_dim12"])
    total = sum(w * float(metrics[f"loss_dim{d}"]) for d, w in zip(DIMS, WEIGHTS))
    assert float(metrics["loss"]) == pytest.approx(total, rel=1e-6)


def test_per_query_matryoshka_equals_torch_formula():
    """dot / sqrt(d) over the first d components, against the query's positive and own negatives."""
    k = 3
    vectors = _vectors(k, seed=1)
    (loss, grads), _ = _ours(vectors, loss="per_query", num_negatives=k)
    table = torch.tensor(vectors, requires_grad=True)
    want = 0.0
    for d, w in zip(DIMS, WEIGHTS):
        cut = table[:, :d]
        q, p, n = cut[:G], cut[G:2 * G], cut[2 * G:].reshape(G, k, d)
        docs = torch.cat([p[:, None], n], dim=1)
        logits = torch.einsum("bd,bkd->bk", q, docs) / d ** 0.5
        want = want + w * torch.nn.functional.cross_entropy(logits, torch.zeros(G, dtype=torch.long))
    want.backward()
    assert float(loss) == pytest.approx(want.item(), rel=1e-5)
    np.testing.assert_allclose(np.asarray(grads), table.grad.numpy(), atol=1e-5 * float(np.abs(grads).max()))


def test_off_is_the_plain_loss_and_all_dimensions_once_is_too():
    vectors = _vectors(1)
    plain = contrastive_loss(vectors, StepConfig(batch_size=G))
    nested = contrastive_loss(vectors, StepConfig(batch_size=G, matryoshka_dims=(D,)))
    assert float(nested["loss"]) == pytest.approx(float(plain["loss"]), rel=1e-6)
    assert set(plain) == {"loss", "accuracy"}


@pytest.mark.parametrize("dims, weights, needle", [
    ((0, 8), (), "positive integer"), ((8, 8), (), "once"), ((8.5,), (), "positive integer"),
    ((8, 4), (1.0,), "1 weights for the 2 dimensions"), ((), (1.0,), "matryoshka_dims is empty")])
def test_bad_dimensions_and_weights_are_refused(dims, weights, needle):
    with pytest.raises(ValueError, match=needle):
        StepConfig(batch_size=G, matryoshka_dims=dims, matryoshka_weights=weights)


def test_a_dimension_past_the_embedding_is_refused_when_traced():
    with pytest.raises(ValueError, match="17 exceeds the model's embedding size 16"):
        contrastive_loss(_vectors(1), StepConfig(batch_size=G, matryoshka_dims=(8, 17)))


def test_train_refuses_bad_dimensions_naming_the_key(tmp_path, capsys):
    model, data = tiny_setup(tmp_path)
    assert cli(train_args(model, data, tmp_path / "w", "--config.loss.matryoshka_dims=(8,16)",
                          "--config.loss.matryoshka_weights=(1.0,)")) == 2
    assert "loss.matryoshka_weights=(1.0,) has 1 weights" in capsys.readouterr().err
    assert cli(train_args(model, data, tmp_path / "w2", "--config.loss.matryoshka_dims=(8,64)")) == 2
    assert "loss.matryoshka_dims=(8, 64): 64 exceeds the model's embedding size 32" in capsys.readouterr().err
