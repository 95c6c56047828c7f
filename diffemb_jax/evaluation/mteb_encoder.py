"""An Embedder behind MTEB's (2.x) encoder protocol, so any MTEB task runs through `mteb.evaluate`.

    encoder = MTEBEncoder("converted/", query_instruction="Given a question, retrieve passages that answer it")
    result = mteb.evaluate(encoder, mteb.get_task("SciFact"), encode_kwargs={"batch_size": 16})

Instructions follow the reference recipe: a query (prompt_type "query") is embedded as
"{instruction}; " + SEPARATOR + text, a document (prompt_type "document") as SEPARATOR + text, with
no instruction. Texts of symmetric tasks (STS, classification, clustering: prompt_type None) are
embedded like queries, one instruction for all, as llm2vec does. The instruction of a task is, in
this order: `query_instruction` when given (one instruction for every task; "" means none);
else `instructions[task name]`, `instructions[task type]`, `instructions["query"]`; else the
task's own prompt from its metadata, else MTEB's default prompt for the task's type (mteb's
`AbsEncoder.get_instruction`). Scores are cosine similarities of the L2-normalised embeddings.

mteb is an optional dependency: this module imports it, nothing else in diffemb_jax does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from diffemb_jax.embedding import Embedder
from diffemb_jax.errors import UserError


class MTEBEncoder(AbsEncoder):
    """mteb.EncoderProtocol over an Embedder (or a model path, loaded with Embedder.from_pretrained)."""

    def __init__(self, model_name: str | Path | Embedder, revision: str | None = None, *, device: str | None = None,
                 query_instruction: str | None = None, instructions: dict[str, str] | None = None,
                 name: str | None = None, **embedder_kwargs: Any):
        """model_name: an Embedder, or a model path for Embedder.from_pretrained(path, **embedder_kwargs)
        (attention, pooling, max_length, batch_size, dtype, ...). device is ignored: JAX places the work.
        name: "organisation/model" under which MTEB files the results (default "diffemb-jax/<folder>")."""
        if isinstance(model_name, Embedder):
            if embedder_kwargs:
                raise UserError(f"embedder options {sorted(embedder_kwargs)} only apply when loading from a path")
            self.model = model_name
            default_name = "diffemb-jax/embedder"
        else:
            self.model = Embedder.from_pretrained(model_name, **embedder_kwargs)
            default_name = f"diffemb-jax/{Path(model_name).resolve().name}"
        self.query_instruction = query_instruction
        self.prompts_dict = dict(instructions) if instructions else None
        cfg = self.model.model.cfg
        self.mteb_model_meta = ModelMeta.create_empty(overwrites={
            "name": name or default_name,
            "revision": revision or "local",
            "framework": ["JAX"],
            "similarity_fn_name": ScoringFunction.COSINE,
            "use_instructions": True,
            "embed_dim": cfg.hidden_size,
            "max_tokens": self.model.max_length,
            "modalities": ["text"],
        })

    def instruction_for(self, task_metadata, prompt_type: PromptType | None) -> str | None:
        """The instruction put in front of texts of this prompt type for this task (None: no instruction)."""
        prompt_type = PromptType.query if prompt_type is None else PromptType(prompt_type)
        if prompt_type == PromptType.document:
            return None
        if self.query_instruction is not None:
            return self.query_instruction or None
        return self.get_instruction(task_metadata, prompt_type) or None

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        """All texts of the DataLoader's batches, embedded in one call; float32 [n, D], L2-normalised."""
        texts: list[str] = []
        for batch in inputs:
            if "text" not in batch:
                raise ValueError(f"task {task_metadata.name}: batches hold {sorted(batch)}; only text tasks are "
                                 "supported")
            texts.extend(batch["text"])
        return self.model.encode(texts, instruction=self.instruction_for(task_metadata, prompt_type),
                                 progress=bool(kwargs.get("show_progress_bar", True)))
