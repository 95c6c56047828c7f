"""Start a server: warm up (every program built before the port opens), then uvicorn on host:port
until SIGTERM or SIGINT. On either, uvicorn stops accepting connections and waits for the requests
it accepted (up to `drain_s`); then the device loop encodes what is left in its queue and stops
(app.py's lifespan). uvicorn then raises the signal again, so the process ends as killed by it
(exit status -15 for SIGTERM), the convention process managers expect."""

from __future__ import annotations

import logging
import time

import uvicorn

from diffemb_jax.errors import UserError
from diffemb_jax.serve.app import Service, create_app
from diffemb_jax.serve.batching import Batcher
from diffemb_jax.serve.metrics import Metrics, compiles, count_compiles
from diffemb_jax.serve.schemas import Limits
from diffemb_jax.serve.warmup import warm_up

log = logging.getLogger(__name__)


def read_api_key(path) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--api-key-file {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if not key:
        raise UserError(f"--api-key-file {path} is empty: write the key on its first line")
    return key


def build_service(embedder, *, model_name: str, max_batch_tokens: int, max_wait_ms: float, max_inputs: int,
                  max_queue: int, prompts: dict[str, str] | None = None, attention: str = "bidirectional") -> Service:
    """Warm the embedder up and start its device loop."""
    if max_inputs > max_queue:
        raise UserError(f"--max-inputs {max_inputs} is more than --max-queue {max_queue}: a full request "
                         "could never be queued")
    count_compiles()
    started = time.monotonic()
    shapes = warm_up(embedder)
    warm = compiles()
    log.warning("warm-up: %d batch shapes, %d programs built, %.1f s", shapes, warm, time.monotonic() - started)
    metrics = Metrics()
    metrics.warmup_compiles.set(warm)
    batcher = Batcher(embedder.encode_tokens_with_norms, max_batch_tokens=max_batch_tokens, max_wait_s=max_wait_ms / 1000,
                      max_queue=max_queue, metrics=metrics).start()
    width = embedder.model.cfg.hidden_size
    prompts = dict(prompts or {})
    info = {"model_id": model_name, "model": model_name, "attention": attention, "pooling": embedder.pooling,
            "skip_instruction": embedder.skip_instruction, "max_input_length": embedder.max_length,
            "max_length": embedder.max_length, "embedding_dimensions": width, "buckets": list(embedder.buckets),
            "batch_size": embedder.batch_size, "max_batch_tokens": max_batch_tokens, "max_wait_ms": max_wait_ms,
            "max_client_batch_size": max_inputs, "max_queue_inputs": max_queue, "prompts": sorted(prompts),
            "batch_shapes": shapes}
    limits = Limits(max_inputs=max_inputs, vocab_size=embedder.model.cfg.vocab_size, width=width, prompts=prompts)
    return Service(embedder.tokenizer, batcher, limits, embedder.max_length, model_name, info, metrics, warm,
                   prompt=embedder.prompt)


def serve(service: Service, *, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          drain_s: float = 30.0) -> None:
    config = uvicorn.Config(create_app(service, api_key), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=drain_s, access_log=False)
    print(f"diffemb serve: http://{host}:{port} (POST /v1/embeddings, /embed; GET /health, /info, /metrics)",
          flush=True)
    try:
        uvicorn.Server(config).run()
    finally:
        service.batcher.close(timeout=drain_s)
