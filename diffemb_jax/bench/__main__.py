"""`python -m diffemb_jax.bench --worker jax|torch JOB.json OUT.json`: one run of the bench in a
process of its own, that imports its own framework's side alone (so its memory is its own)."""

import sys

if len(sys.argv) != 5 or sys.argv[1] != "--worker" or sys.argv[2] not in ("jax", "torch"):
    sys.exit("usage: python -m diffemb_jax.bench --worker jax|torch JOB.json OUT.json")

from diffemb_jax.bench.workers import run_worker  # noqa: E402

if sys.argv[2] == "jax":
    from diffemb_jax.bench import jax_side as side
else:
    from diffemb_jax.bench import torch_reference as side
run_worker(side, *sys.argv[3:])
