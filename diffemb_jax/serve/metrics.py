"""Prometheus metrics of one server (its own registry), and the count of XLA compilations.

Compilations are counted through JAX's public monitoring events: every program JAX builds (compiled,
or loaded from the persistent cache) records "/jax/core/compile/backend_compile_duration". The
server reads the count after warm-up; `timed_compiles` is how many came after it (0 expected: the
warm-up built every bucket's programs).
"""

from __future__ import annotations

import threading

import jax
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_compiles = 0
_listening = False


def _on_event(event: str, duration: float, **kwargs) -> None:
    global _compiles
    if event == COMPILE_EVENT:
        with _lock:
            _compiles += 1


def count_compiles() -> None:
    """Start counting (once a process; JAX keeps its listeners for the process's life)."""
    global _listening
    with _lock:
        if not _listening:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _listening = True


def compiles() -> int:
    with _lock:
        return _compiles


_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("diffemb_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.inputs = Counter("diffemb_inputs", "inputs (texts or token lists) embedded", registry=r)
        self.tokens = Counter("diffemb_tokens", "tokens embedded (prompt tokens)", registry=r)
        self.latency = Histogram("diffemb_request_latency_seconds", "request latency, received to answered",
                                 ["route"], buckets=_LATENCY, registry=r)
        self.queue_time = Histogram("diffemb_queue_seconds", "time a request's inputs waited for the device loop",
                                    buckets=_LATENCY, registry=r)
        self.encode_time = Histogram("diffemb_encode_seconds", "time of one device-loop encode",
                                     buckets=_LATENCY, registry=r)
        self.batch_inputs = Histogram("diffemb_batch_inputs", "inputs per device-loop encode",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.batch_tokens = Histogram("diffemb_batch_tokens", "tokens per device-loop encode",
                                      buckets=(32, 128, 512, 2048, 8192, 32768, 131072), registry=r)
        self.queue_depth = Gauge("diffemb_queue_inputs", "inputs waiting for the device loop", registry=r)
        self.timed_compiles = Gauge("diffemb_timed_compiles", "XLA compilations after warm-up (0 expected)",
                                    registry=r)
        self.warmup_compiles = Gauge("diffemb_warmup_compiles", "XLA compilations of the warm-up", registry=r)
