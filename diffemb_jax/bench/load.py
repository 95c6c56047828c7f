"""A bounded load on an embedding server: a fixed list of requests, at most `concurrency` in flight,
none started after `duration_s`, so it always stops by itself. What a client sees: each request's
latency (sent to answered, read whole), the texts and tokens answered, the wall time of them all.

The client is HTTP/1.1 on asyncio's streams, one kept-alive connection per request in flight, and
nothing more: the server and the load share this machine's cores, and httpx's AsyncClient cost
3 to 8 ms of CPU a request here (against the server's 0.6 ms), so what was measured was httpx.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import numpy as np
import orjson


class ProtocolError(Exception):
    """An answer this client does not read (no Content-Length, a closed connection)."""


def percentiles_ms(latencies: list[float]) -> dict:
    """p50, p95 and p99 of latencies in seconds, in milliseconds (None where there are none)."""
    if not latencies:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    p50, p95, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


class _Connection:
    """One kept-alive HTTP/1.1 connection: POST a JSON body, read the JSON answer."""

    def __init__(self, host: str, port: int):
        self.host, self.port, self.streams = host, port, None

    async def post(self, path: str, body: dict) -> tuple[int, object]:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        data = orjson.dumps(body)
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode("ascii") + data)
        await writer.drain()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            raise ProtocolError("the server closed the connection") from None
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
        length = next((v for k, v in headers.items() if k.strip().lower() == "content-length"), None)
        if length is None:
            raise ProtocolError(f"an answer ({status}) without Content-Length")
        answer = orjson.loads(await reader.readexactly(int(length)))
        if any(k.strip().lower() == "connection" and v.strip().lower() == "close" for k, v in headers.items()):
            self.close()
        return status, answer

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


async def _load(url: str, requests: list[list[str]], concurrency: int, duration_s: float, encoding_format: str,
                timeout_s: float) -> dict:
    parts = urlsplit(url)
    latencies, failures = [], []
    sent = texts = tokens = 0
    queue = iter(requests)  # one iterator shared by all clients: each request is sent once
    started = time.perf_counter()
    deadline = started + duration_s

    async def client():
        nonlocal sent, texts, tokens
        connection = _Connection(parts.hostname, parts.port)
        try:
            for inputs in queue:
                if time.perf_counter() > deadline:
                    return
                sent, start = sent + 1, time.perf_counter()
                try:
                    status, body = await asyncio.wait_for(
                        connection.post("/v1/embeddings", {"input": inputs, "encoding_format": encoding_format}),
                        timeout_s)
                except (OSError, ProtocolError, ValueError, asyncio.TimeoutError) as e:
                    failures.append(f"{type(e).__name__}: {e}")
                    connection.close()
                    continue
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    failures.append(f"{status}: {body}")
                elif len(body["data"]) != len(inputs):
                    failures.append(f"{len(inputs)} inputs got {len(body['data'])} vectors")
                else:
                    texts += len(inputs)
                    tokens += body["usage"]["prompt_tokens"]
        finally:
            connection.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    return {"requests": sent, "requests_asked": len(requests), "texts": texts, "tokens": tokens, "seconds": seconds,
            "failures": len(failures), "first_failure": failures[0] if failures else None,
            "concurrency": concurrency, "texts_per_s": texts / seconds, "tokens_per_s": tokens / seconds,
            **percentiles_ms(latencies)}


def run_load(url: str, requests: list[list[str]], *, concurrency: int, duration_s: float,
             encoding_format: str = "float", timeout_s: float = 120.0) -> dict:
    """Send `requests` (each a list of texts) to url's /v1/embeddings, `concurrency` at a time, none
    started after duration_s; their count, texts, tokens, seconds, throughput and latency percentiles."""
    return asyncio.run(_load(url, requests, concurrency, duration_s, encoding_format, timeout_s))
