"""What each kind of bench (encode, train, long) does in the parent: one table, so that the parent's
loop (compare.py) is the same for all three. The workers' side is workers.WORK."""

from __future__ import annotations

import dataclasses
from typing import Callable

from diffemb_jax.bench import encode, long, train


@dataclasses.dataclass(frozen=True)
class Kind:
    """One thing to bench: the job the parent builds, its runs, their model FLOPs, the report."""

    prepare: Callable  # (args, tokenizer) -> (settings: reported, payload: sent to workers only)
    runs: Callable  # (settings) -> {key: (framework, what its job changes)}: one worker each, in turn
    flops: Callable  # (job, model config dict, a run's result) -> its (model FLOPs, tokens), formula lines
    columns: tuple[tuple[str, str], ...]
    summarize: Callable  # (results) -> (summary fields, lines to print)
    skip: Callable | None = None  # (framework, changes, results so far, settings) -> why a run is not made


KINDS = {
    "encode": Kind(prepare=encode.prepare, runs=encode.runs, flops=encode.model_flops, columns=encode.COLUMNS,
                   summarize=encode.summarize),
    "train": Kind(prepare=train.prepare, runs=train.runs, flops=train.model_flops, columns=train.COLUMNS,
                  summarize=train.summarize),
    "long": Kind(prepare=long.prepare, runs=long.runs, flops=long.model_flops, columns=long.COLUMNS,
                 summarize=long.summarize, skip=long.skip),
}
