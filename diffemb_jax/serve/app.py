"""The ASGI app (Starlette): routes, the API-key check, and errors in OpenAI's shape.

    POST /v1/embeddings   OpenAI's embeddings API (the `openai` client works unchanged)
    POST /embed           text-embeddings-inference's: a JSON list of vectors
    GET  /health          200 while the device loop runs, 503 otherwise (no key needed)
    GET  /info            model, attention, pooling, max length, limits, compile counts
    GET  /metrics         Prometheus text format

Every request body is JSON (Content-Type application/json, else 415; at most MAX_BODY bytes, else
413; malformed JSON 400). Unknown routes 404, wrong methods 405, all in OpenAI's error JSON.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hmac
import json
import logging
import time

import anyio.to_thread
import numpy as np
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from diffemb_jax.embedding.dimensions import truncate
from diffemb_jax.serve.batching import Batcher
from diffemb_jax.serve.errors import ApiError, error_response, invalid
from diffemb_jax.serve.metrics import Metrics, compiles
from diffemb_jax.serve.schemas import Limits, openai_request, tei_request
from diffemb_jax.serve.tokens import request_tokens

log = logging.getLogger(__name__)
MAX_BODY = 64 * 2**20
OPEN_PATHS = ("/health",)
INLINE_CHARS = 4096  # a request with fewer characters is tokenised on the event loop: a thread hop costs more


class FastJSON(Response):
    """JSON by orjson, numpy rows included: a float32 is written as the shortest decimal that reads
    back to the same float32 (json.dumps of .tolist() writes its float64's 17 digits, ~40x slower:
    65 ms for 32 vectors of 576 on this machine's CPU, the event loop blocked all along)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


@dataclasses.dataclass
class Service:
    """What the routes serve from: the tokenizer, the batcher, the limits, what /info says."""

    tokenizer: object
    batcher: Batcher
    limits: Limits
    max_length: int
    model_name: str
    info: dict
    metrics: Metrics
    warmup_compiles: int = 0
    prompt: str | None = None  # the Embedder's sentence-transformers prompt

    def timed_compiles(self) -> int:
        return compiles() - self.warmup_compiles


async def _body(request: Request):
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise invalid(f"Content-Type must be application/json, got {kind or 'none'}", status=415,
                      code="unsupported_media_type")
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        raise invalid(f"the body is larger than {MAX_BODY} bytes", status=413)
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise invalid(f"the body is larger than {MAX_BODY} bytes", status=413)
    try:
        return orjson.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # orjson's error is a json.JSONDecodeError
        raise invalid(f"the body is not valid JSON: {e}") from None


async def _tokens(service: Service, request, field: str) -> tuple[list, list]:
    """The request's token ids: a short request tokenised at once, a long one in a worker thread so
    that the event loop goes on serving the others meanwhile."""
    if request.texts is None or sum(map(len, request.texts)) < INLINE_CHARS:
        return request_tokens(service.tokenizer, request, service.max_length, field, service.prompt)
    return await anyio.to_thread.run_sync(request_tokens, service.tokenizer, request, service.max_length, field,
                                          service.prompt)


async def _embed(service: Service, request, field: str) -> tuple[np.ndarray, int]:
    """(vectors of the request's inputs, its prompt tokens)."""
    ids, embed_lengths = await _tokens(service, request, field)
    vectors, norms, waited = await service.batcher.embed(ids, embed_lengths)
    tokens = sum(map(len, ids))
    service.metrics.queue_time.observe(waited)
    service.metrics.inputs.inc(len(ids))
    service.metrics.tokens.inc(tokens)
    if not request.normalize:  # the pooled vectors themselves (their first N components, as they are)
        vectors = (vectors * norms[:, None])[:, : request.dimensions]
    elif request.dimensions is not None:
        vectors = truncate(vectors, request.dimensions)
    return np.ascontiguousarray(vectors, np.float32), tokens


def _vector(v: np.ndarray, encoding_format: str):
    if encoding_format == "base64":  # float32 little-endian, as OpenAI's client decodes it
        return base64.b64encode(np.asarray(v, "<f4").tobytes()).decode("ascii")
    return v  # FastJSON writes it


def _routes(service: Service) -> list[Route]:
    async def openai_embeddings(http: Request):
        request = openai_request(await _body(http), service.limits)
        vectors, tokens = await _embed(service, request, "input")
        data = [{"object": "embedding", "index": i, "embedding": _vector(v, request.encoding_format)}
                for i, v in enumerate(vectors)]
        return FastJSON({"object": "list", "data": data, "model": request.model or service.model_name,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def tei_embed(http: Request):
        request = tei_request(await _body(http), service.limits)
        vectors, _ = await _embed(service, request, "inputs")
        return FastJSON(vectors)

    async def health(http: Request):
        if not service.batcher.alive:
            raise ApiError(503, "the device loop is not running", type="server_error")
        return JSONResponse({"status": "ok"})

    async def info(http: Request):
        return JSONResponse({**service.info, "warmup_compiles": service.warmup_compiles,
                             "timed_compiles": service.timed_compiles()})

    async def metrics(http: Request):
        service.metrics.timed_compiles.set(service.timed_compiles())
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return [Route("/v1/embeddings", openai_embeddings, methods=["POST"]),
            Route("/embeddings", openai_embeddings, methods=["POST"]),
            Route("/embed", tei_embed, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/info", info, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"])]


class _Guard:
    """Outermost ASGI layer: the API key (constant-time), per-route metrics, and a last catch so that
    nothing escapes as a bare 500."""

    def __init__(self, app, service: Service, api_key: str | None):
        self.app, self.service = app, service
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, path, status = time.monotonic(), scope["path"], {}

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.expected is not None and path not in OPEN_PATHS:
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, self.expected):
                    return await error_response(401, "missing or wrong API key: send Authorization: Bearer <key>",
                                                code="invalid_api_key",
                                                headers={"WWW-Authenticate": "Bearer"})(scope, receive, sending)
            await self.app(scope, receive, sending)
        finally:
            route = path if path in KNOWN else "other"
            m = self.service.metrics
            m.requests.labels(route, str(status.get("code", 499))).inc()
            m.latency.labels(route).observe(time.monotonic() - started)


KNOWN = ("/v1/embeddings", "/embeddings", "/embed", "/health", "/info", "/metrics")


async def _api_error(request, exc: ApiError):
    return exc.response()


async def _http_error(request, exc: HTTPException):
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return error_response(exc.status_code, message.get(exc.status_code, str(exc.detail)),
                          code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code),
                          headers=getattr(exc, "headers", None))


async def _crash(request, exc: Exception):
    log.exception("unexpected error on %s", request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}", type="server_error")


def create_app(service: Service, api_key: str | None = None):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn runs this once the requests it accepted are answered: the queue is empty by now
        await anyio.to_thread.run_sync(service.batcher.close)
        print("diffemb serve: stopped, every accepted request answered", flush=True)

    app = Starlette(routes=_routes(service), lifespan=lifespan,
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _crash})
    return _Guard(app, service, api_key)
