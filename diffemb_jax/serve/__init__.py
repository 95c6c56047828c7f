"""`diffemb serve`: an embedding server on the jit-compiled Embedder, OpenAI- and TEI-compatible.

- schemas.py: request bodies read and checked (OpenAI's /v1/embeddings, TEI's /embed);
- tokens.py: inputs into token ids with the project's prompt format, over-long ones refused or cut;
- batching.py: the queue and the one device loop that encodes many requests together;
- warmup.py: every batch shape built before the port opens;
- metrics.py: Prometheus metrics and the XLA compile count (timed_compiles);
- errors.py: OpenAI's error JSON; app.py: routes and the API key; server.py: warm-up, uvicorn, drain.

Framework: Starlette on uvicorn. The server is five routes whose bodies must be checked by hand
anyway to answer in OpenAI's error shape (FastAPI's pydantic validation answers 422 in its own
shape, which would have to be overridden route by route); Starlette is the small, well-kept ASGI
core FastAPI itself is built on, and uvicorn is its reference server, with graceful shutdown on
SIGTERM (stop accepting, finish what was accepted) built in.
"""
