"""Generate golden values from the real ``llm2vec`` library (oracle for loss + pooling).

llm2vec pins ``transformers<=4.44.2``, so this script runs in its OWN venv, not in
the project's environment.  The resulting ``tests/goldens/llm2vec.npz`` is committed
and read by tests in the main environment (numpy only, no torch/llm2vec needed).

Environment (one-off)::

    python3.11 -m venv /work/llm2vec-env
    /work/llm2vec-env/bin/pip install torch==2.13.0          # CPU wheel, FIRST
    /work/llm2vec-env/bin/pip install llm2vec==0.2.3 "transformers==4.44.2" "torch==2.13.0"

Regenerate (from the repo root)::

    /work/llm2vec-env/bin/python tests/goldens/make_llm2vec_goldens.py

Oracle code used (site-packages paths):
  * loss:    ``llm2vec/loss/HardNegativeNLLLoss.py`` -> ``HardNegativeNLLLoss``
  * pooling: ``llm2vec/llm2vec.py`` -> ``LLM2Vec.get_pooling`` (which itself calls
    ``LLM2Vec._skip_instruction`` when ``skip_instruction`` is True).

Nothing is reimplemented here: every stored output comes from llm2vec's own code.
See ``tests/goldens/README.md`` for the key list and llm2vec's semantics.
"""

from __future__ import annotations

import os
import random
import types

import numpy as np
import torch
from torch import nn

import llm2vec
import transformers
from llm2vec import LLM2Vec
from llm2vec.loss.HardNegativeNLLLoss import HardNegativeNLLLoss

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llm2vec.npz")

# ----------------------------------------------------------------------------- seeding
random.seed(0)
np.random.seed(0)
torch.manual_seed(0)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

out: dict[str, np.ndarray] = {}

# ----------------------------------------------------------------------------- metadata
out["meta_llm2vec_version"] = np.array(llm2vec.__version__ if hasattr(llm2vec, "__version__")
                                       else __import__("llm2vec.version").version.__version__)
out["meta_transformers_version"] = np.array(transformers.__version__)
out["meta_torch_version"] = np.array(torch.__version__)

# ============================================================================= loss
B, D = 8, 16
rng = np.random.default_rng(0)
loss_q = rng.standard_normal((B, D)).astype(np.float32)
loss_pos = rng.standard_normal((B, D)).astype(np.float32)
loss_neg = rng.standard_normal((B, D)).astype(np.float32)
out["loss_q"], out["loss_pos"], out["loss_neg"] = loss_q, loss_pos, loss_neg


def run_loss(scale: float, with_neg: bool, dtype=torch.float32):
    q = torch.tensor(loss_q, dtype=dtype, requires_grad=True)
    p = torch.tensor(loss_pos, dtype=dtype, requires_grad=True)
    n = torch.tensor(loss_neg, dtype=dtype, requires_grad=True) if with_neg else None
    loss = HardNegativeNLLLoss(scale=scale)(q, p, n)
    loss.backward()
    grads = (q.grad.numpy(), p.grad.numpy(), n.grad.numpy() if with_neg else None)
    return loss.detach().numpy(), grads


for scale in (50, 20):
    tag = f"scale{scale}"
    loss, (gq, gp, gn) = run_loss(float(scale), with_neg=True)
    out[f"loss_{tag}"] = loss.astype(np.float32)
    out[f"grad_q_{tag}"] = gq.astype(np.float32)
    out[f"grad_pos_{tag}"] = gp.astype(np.float32)
    out[f"grad_neg_{tag}"] = gn.astype(np.float32)

    loss, (gq, gp, _) = run_loss(float(scale), with_neg=False)
    out[f"loss_{tag}_no_neg"] = loss.astype(np.float32)
    out[f"grad_q_{tag}_no_neg"] = gq.astype(np.float32)
    out[f"grad_pos_{tag}_no_neg"] = gp.astype(np.float32)

    # float64 run of the same llm2vec code (tighter reference for the fp32 values)
    loss64, _ = run_loss(float(scale), with_neg=True, dtype=torch.float64)
    out[f"loss_{tag}_f64"] = loss64.astype(np.float64)
    loss64, _ = run_loss(float(scale), with_neg=False, dtype=torch.float64)
    out[f"loss_{tag}_no_neg_f64"] = loss64.astype(np.float64)

# ============================================================================= pooling
PB, PL, PH = 4, 10, 16
pool_reps = rng.standard_normal((PB, PL, PH)).astype(np.float32)
pool_lengths = np.array([10, 7, 4, 1], dtype=np.int64)     # real (non-pad) lengths
pool_embed_k = np.array([6, 7, 2, 1], dtype=np.int64)      # last k real tokens = "text"
attn = np.zeros((PB, PL), dtype=np.int64)
emb = np.zeros((PB, PL), dtype=np.int64)
for i in range(PB):
    attn[i, PL - pool_lengths[i]:] = 1                     # LEFT padding
    emb[i, PL - pool_embed_k[i]:] = 1
# input_ids only matter for "bos_token" pooling: BOS (id 1) at the first real position
BOS_ID = 1
input_ids = np.full((PB, PL), 2, dtype=np.int64)           # 2 = pad/eos (llm2vec pad=eos)
for i in range(PB):
    input_ids[i, PL - pool_lengths[i]:] = 100 + np.arange(pool_lengths[i])
    input_ids[i, PL - pool_lengths[i]] = BOS_ID

out["pool_reps"] = pool_reps
out["pool_attention_mask"] = attn
out["pool_embed_mask"] = emb
out["pool_lengths"] = pool_lengths
out["pool_embed_k"] = pool_embed_k
out["pool_input_ids"] = input_ids
out["pool_bos_token_id"] = np.array(BOS_ID, dtype=np.int64)

# Edge case: a row whose embed_mask is all zero (no text after the instruction
# separator, e.g. encode() of an empty document).  llm2vec then slices
# reps[i, -0:] == reps[i, 0:] for "mean" (mean over ALL positions, pads included)
# and produces a zero vector for "weighted_mean".
emb_edge = emb.copy()
emb_edge[2, :] = 0
out["pool_embed_mask_edge"] = emb_edge


def make_llm2vec(pooling_mode: str, skip_instruction: bool) -> LLM2Vec:
    """LLM2Vec without a model: only the attributes get_pooling reads."""
    obj = LLM2Vec.__new__(LLM2Vec)
    nn.Module.__init__(obj)  # nn.Module bookkeeping; LLM2Vec.__init__ would need a model
    obj.pooling_mode = pooling_mode
    obj.skip_instruction = skip_instruction
    # get_pooling asserts tokenizer.padding_side == "left" (from_pretrained sets it)
    # and reads tokenizer.bos_token_id for "bos_token".
    obj.tokenizer = types.SimpleNamespace(padding_side="left", bos_token_id=BOS_ID)
    return obj


def run_pool(pooling_mode: str, skip_instruction: bool, embed_mask: np.ndarray) -> np.ndarray:
    model = make_llm2vec(pooling_mode, skip_instruction)
    # Exactly the features dict LLM2Vec.forward hands to get_pooling after running the
    # model: forward pops "embed_mask", runs self.model(**features), puts it back, then
    # calls self.get_pooling(features, reps.last_hidden_state).  get_pooling itself
    # calls self._skip_instruction(features) (attention_mask := embed_mask, in place).
    features = {
        "input_ids": torch.tensor(input_ids),
        "attention_mask": torch.tensor(attn),
        "embed_mask": torch.tensor(embed_mask),
    }
    with torch.no_grad():
        res = model.get_pooling(features, torch.tensor(pool_reps))
    return res.numpy().astype(np.float32)


POOL_MODES = ["mean", "weighted_mean", "eos_token", "last_token", "bos_token"]
for mode in POOL_MODES:
    for skip in (False, True):
        out[f"pool_{mode}_skip{skip}"] = run_pool(mode, skip, emb)
for mode in ("mean", "weighted_mean"):
    out[f"pool_{mode}_skipTrue_edge"] = run_pool(mode, True, emb_edge)

# ============================================================================= write
np.savez_compressed(OUT, **out)
size = os.path.getsize(OUT)
print(f"wrote {OUT} ({size} bytes)")
assert size < 200_000, size
with np.load(OUT) as z:
    for k in z.files:
        a = z[k]
        print(f"  {k:32s} {str(a.dtype):8s} {a.shape}" + (f"  = {a}" if a.ndim == 0 else ""))
