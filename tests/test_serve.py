"""`diffemb serve` against real server processes on 127.0.0.1, with real clients (the `openai`
package and httpx): vectors equal `diffemb encode`'s, concurrent requests each get their own rows
with no compilation after warm-up, every bad input gets a 4xx in OpenAI's error shape, the API key,
the bounded queue, and SIGTERM draining a request in flight.

Two servers a module (tiny Qwen2, max length 64, batch 4, so the warm-up builds 8 programs): `open_server`,
and `guarded_server` (an API key, a queue of 8 inputs, 1.5 s of batching wait so a request stays in
flight); they share a persistent compilation cache, so the second loads the first's programs.
Oracle: `diffemb encode` run in this process through diffemb_jax.cli.main.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

import tiny

REPO = Path(__file__).resolve().parents[1]
SERVE_FLAGS = ["--max-length", "64", "--batch-size", "4"]
TEXTS = [" ".join(tiny.WORDS[(i + k) % len(tiny.WORDS)] for k in range(n))
         for i, n in zip(range(0, 84, 7), (3, 9, 1, 14, 5, 30, 2, 8, 11, 4, 6, 20))]
INSTRUCTION = "Given a query retrieve documents"
TOO_LONG = " ".join(tiny.WORDS[i % len(tiny.WORDS)] for i in range(90))  # 90 tokens > 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, cache: Path, log: Path, *extra: str):
        self.port, self.log = _free_port(), log
        env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_ENABLE_COMPILATION_CACHE": "true",
               "DIFFEMB_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
        self.proc = subprocess.Popen([sys.executable, "-m", "diffemb_jax.cli", "serve", "--model", str(model),
                                      "--port", str(self.port), *SERVE_FLAGS, *extra],
                                     env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait(self, timeout: float = 240) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited ({self.proc.returncode}):\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        pytest.fail(f"the server did not answer /health in {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny.write_checkpoint("qwen2", tmp_path_factory.mktemp("serve") / "qwen2")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-cache")


def _encode(model: Path, tmp: Path, texts: list[str], *flags: str) -> np.ndarray:
    from diffemb_jax import cli

    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "in.txt").write_text("\n".join(texts) + "\n")
    out = tmp / f"out{len(list(tmp.glob('out*.npy')))}.npy"
    assert cli.main(["encode", "--model", str(model), "--input", str(tmp / "in.txt"), "--output", str(out),
                     *SERVE_FLAGS, *flags]) == 0
    return np.load(out)


@pytest.fixture(scope="module")
def open_server(model_dir, cache, tmp_path_factory):
    """(server, reference vectors of TEXTS plain and with INSTRUCTION): encode runs while the server warms up."""
    tmp = tmp_path_factory.mktemp("open")
    server = Server(model_dir, cache, tmp / "server.log", "--max-inputs", "32", "--prompt", f"query={INSTRUCTION}")
    try:
        plain = _encode(model_dir, tmp / "enc", TEXTS)
        instructed = _encode(model_dir, tmp / "enc", TEXTS, "--instruction", INSTRUCTION)
        truncated = _encode(model_dir, tmp / "enc", [TOO_LONG])
        yield server.wait(), {"plain": plain, "instructed": instructed, "truncated": truncated}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def guarded_server(model_dir, cache, tmp_path_factory, open_server):  # after open_server: its programs are cached
    tmp = tmp_path_factory.mktemp("guarded")
    (tmp / "key").write_text("s3cret-key\n")
    server = Server(model_dir, cache, tmp / "server.log", "--api-key-file", str(tmp / "key"), "--max-queue", "8",
                    "--max-inputs", "8", "--max-wait-ms", "1500")
    try:
        yield server.wait()
    finally:
        server.stop()


def test_openai_client_gets_encode_vectors(open_server):
    server, ref = open_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    got = client.embeddings.create(model="tiny", input=TEXTS)  # the client asks for base64 and decodes it
    assert [d.index for d in got.data] == list(range(len(TEXTS)))
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), ref["plain"], atol=1e-5)
    assert got.model == "tiny" and got.usage.prompt_tokens == sum(len(t.split()) for t in TEXTS)
    floats = client.embeddings.create(model="tiny", input=TEXTS[:3], encoding_format="float")
    np.testing.assert_allclose(np.array([d.embedding for d in floats.data]), ref["plain"][:3], atol=1e-5)
    one = client.embeddings.create(model="tiny", input=TEXTS[5], extra_body={"instruction": INSTRUCTION})
    np.testing.assert_allclose(one.data[0].embedding, ref["instructed"][5], atol=1e-5)
    short = client.embeddings.create(model="tiny", input=TEXTS[:2], dimensions=8)
    cut = ref["plain"][:2, :8] / np.linalg.norm(ref["plain"][:2, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(np.array([d.embedding for d in short.data]), cut, atol=1e-5)


def test_http_tei_token_ids_truncate_base64(open_server, model_dir):
    server, ref = open_server
    with httpx.Client(base_url=server.url, timeout=30) as http:
        tei = http.post("/embed", json={"inputs": TEXTS, "normalize": True})
        assert tei.status_code == 200
        np.testing.assert_allclose(np.array(tei.json()), ref["plain"], atol=1e-5)
        named = http.post("/embed", json={"inputs": TEXTS[3], "prompt_name": "query"})
        np.testing.assert_allclose(np.array(named.json())[0], ref["instructed"][3], atol=1e-5)
        from diffemb_jax.checkpoints import load_model

        tokenizer = load_model(model_dir)[1]
        ids = [tokenizer.encode(t).ids for t in TEXTS[:4]]
        by_ids = http.post("/v1/embeddings", json={"input": ids, "encoding_format": "float"}).json()
        np.testing.assert_allclose(np.array([d["embedding"] for d in by_ids["data"]]), ref["plain"][:4], atol=1e-5)
        one_list = http.post("/v1/embeddings", json={"input": ids[1]}).json()  # one list of ids is one input
        assert len(one_list["data"]) == 1
        cut = http.post("/v1/embeddings", json={"input": [TOO_LONG], "truncate": True, "encoding_format": "base64"})
        vector = np.frombuffer(base64.b64decode(cut.json()["data"][0]["embedding"]), "<f4")
        np.testing.assert_allclose(vector, ref["truncated"][0], atol=1e-5)
        assert cut.json()["usage"]["prompt_tokens"] == 64
        info = http.get("/info").json()
        assert info["attention"] == "bidirectional" and info["pooling"] == "mean" and info["max_length"] == 64


def test_tei_normalize_false_gives_the_pooled_vectors(open_server, model_dir):
    """normalize=false: the mean-pooled hidden states themselves. Oracle: transformers' final hidden
    states of the checkpoint's model (bidirectional mask) averaged over the tokens, fp32, atol 1e-4;
    and the normalised vector (diffemb encode's) x the pooled vector's norm, atol 1e-5."""
    server, ref = open_server
    with httpx.Client(base_url=server.url, timeout=30) as http:
        raw = np.array(http.post("/embed", json={"inputs": TEXTS[:4], "normalize": False}).json())
        cut = np.array(http.post("/embed", json={"inputs": TEXTS[:4], "normalize": False, "dimensions": 8}).json())
        unit = np.array(http.post("/embed", json={"inputs": TEXTS[:4], "normalize": True}).json())
    from diffemb_jax.checkpoints import load_model

    tokenizer, oracle = load_model(model_dir)[1], tiny.oracle_model("qwen2")
    for i, text in enumerate(TEXTS[:4]):
        ids = [tokenizer.encode(text).ids]
        hidden = tiny.oracle_hidden(oracle, ids, [[1] * len(ids[0])], "bidirectional")[0]
        np.testing.assert_allclose(raw[i], hidden.mean(0), atol=1e-4, rtol=1e-4)
    norms = np.linalg.norm(raw, axis=1, keepdims=True)
    assert np.all(np.abs(norms - 1) > 1e-2), norms  # not unit vectors: the request was honoured
    np.testing.assert_allclose(raw, ref["plain"][:4] * norms, atol=1e-5)
    np.testing.assert_allclose(unit, ref["plain"][:4], atol=1e-5)
    np.testing.assert_allclose(cut, raw[:, :8], atol=1e-6)  # the first 8 components, as they are


def test_concurrent_requests_each_get_their_own_rows(open_server):
    server, ref = open_server
    n = 96
    picks = [[(i * 5 + k) % len(TEXTS) for k in range(1 + i % 3)] for i in range(n)]

    async def main():
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:
            return await asyncio.gather(*[
                http.post("/v1/embeddings", json={"input": [TEXTS[j] for j in pick], "encoding_format": "float"})
                for pick in picks])

    before = _metric(server, "diffemb_batch_inputs_count")
    answers = asyncio.run(main())
    for pick, answer in zip(picks, answers):
        assert answer.status_code == 200, answer.text
        got = np.array([d["embedding"] for d in answer.json()["data"]])
        np.testing.assert_allclose(got, ref["plain"][pick], atol=1e-5)
    encodes = _metric(server, "diffemb_batch_inputs_count") - before
    assert encodes < n, f"{n} requests took {encodes} encodes: nothing was batched together"
    assert httpx.get(server.url + "/info").json()["timed_compiles"] == 0
    assert _metric(server, "diffemb_timed_compiles") == 0


def _metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def _bad_requests():
    json_post = lambda path, body: ("POST", path, {"json": body})  # noqa: E731
    return {
        "empty string": (400, json_post("/v1/embeddings", {"input": ""})),
        "blank string in a list": (400, json_post("/v1/embeddings", {"input": ["ok", "  "]})),
        "empty list": (400, json_post("/v1/embeddings", {"input": []})),
        "non-string item": (400, json_post("/v1/embeddings", {"input": ["the cat", 3]})),
        "null item": (400, json_post("/v1/embeddings", {"input": [None]})),
        "object input": (400, json_post("/v1/embeddings", {"input": {"text": "cat"}})),
        "missing input": (400, json_post("/v1/embeddings", {"model": "x"})),
        "body not an object": (400, json_post("/v1/embeddings", ["the cat"])),
        "over-long input": (400, json_post("/v1/embeddings", {"input": [TOO_LONG]})),
        "too many inputs": (400, json_post("/v1/embeddings", {"input": ["the cat"] * 33})),
        "token id out of range": (400, json_post("/v1/embeddings", {"input": [[3, 4, 100000]]})),
        "empty token list": (400, json_post("/v1/embeddings", {"input": [[]]})),
        "token ids with an instruction": (400, json_post("/v1/embeddings", {"input": [3, 4], "instruction": "x"})),
        "bad encoding_format": (400, json_post("/v1/embeddings", {"input": "cat", "encoding_format": "xml"})),
        "dimensions 0": (400, json_post("/v1/embeddings", {"input": "cat", "dimensions": 0})),
        "dimensions too many": (400, json_post("/v1/embeddings", {"input": "cat", "dimensions": 33})),
        "TEI empty inputs": (400, json_post("/embed", {"inputs": []})),
        "TEI over-long": (400, json_post("/embed", {"inputs": TOO_LONG})),
        "TEI normalize not a bool": (400, json_post("/embed", {"inputs": "cat", "normalize": "no"})),
        "TEI unknown prompt_name": (400, json_post("/embed", {"inputs": "cat", "prompt_name": "nope"})),
        "malformed JSON": (400, ("POST", "/v1/embeddings",
                                 {"content": b'{"input": [', "headers": {"content-type": "application/json"}})),
        "wrong content type": (415, ("POST", "/v1/embeddings",
                                     {"content": b'{"input": "cat"}', "headers": {"content-type": "text/plain"}})),
        "unknown route": (404, ("POST", "/v1/nothing", {"json": {"input": "cat"}})),
        "wrong method": (405, ("GET", "/v1/embeddings", {})),
    }


def test_bad_input_gets_a_4xx_in_openai_shape(open_server):
    server, ref = open_server
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for name, (status, (method, path, kwargs)) in _bad_requests().items():
            answer = http.request(method, path, **kwargs)
            assert answer.status_code == status, (name, answer.status_code, answer.text)
            error = answer.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], (name, error)
        assert http.post("/v1/embeddings", json={"input": [TOO_LONG]}).json()["error"]["code"] == \
            "context_length_exceeded"
        assert http.get("/health").status_code == 200  # the device loop lives on
        good = http.post("/v1/embeddings", json={"input": TEXTS[:2], "encoding_format": "float"}).json()
        np.testing.assert_allclose(np.array([d["embedding"] for d in good["data"]]), ref["plain"][:2], atol=1e-5)
    with pytest.raises(openai.BadRequestError, match="at most 64"):
        openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).embeddings.create(
            model="tiny", input=TOO_LONG)


def test_api_key(guarded_server, open_server):
    url = guarded_server.url
    assert httpx.post(url + "/v1/embeddings", json={"input": "the cat"}).status_code == 401
    wrong = httpx.post(url + "/v1/embeddings", json={"input": "the cat"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/info").status_code == 401
    assert httpx.get(url + "/health").status_code == 200
    client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret-key", max_retries=0)
    got = client.embeddings.create(model="tiny", input=TEXTS[:2])
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), open_server[1]["plain"][:2], atol=1e-5)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).embeddings.create(model="t", input="a")
    # and without --api-key-file, no key is asked for (open_server's every test)
    assert httpx.get(open_server[0].url + "/info").status_code == 200


def _in_background(url: str, body: dict) -> tuple[threading.Thread, dict]:
    result = {}

    def post():
        try:
            result["answer"] = httpx.post(url + "/v1/embeddings", json=body,
                                          headers={"Authorization": "Bearer s3cret-key"}, timeout=60)
        except Exception as e:  # noqa: BLE001 - the test reads it
            result["error"] = e

    thread = threading.Thread(target=post)
    thread.start()
    return thread, result


def test_full_queue_answers_429_with_retry_after(guarded_server):
    url = guarded_server.url
    thread, result = _in_background(url, {"input": TEXTS[:8]})  # fills the queue of 8 for 1.5 s
    time.sleep(0.5)
    full = httpx.post(url + "/v1/embeddings", json={"input": "the cat"}, headers={"Authorization": "Bearer s3cret-key"})
    thread.join()
    assert full.status_code == 429 and full.headers["retry-after"] == "1", full.text
    assert full.json()["error"]["code"] == "queue_full"
    assert result["answer"].status_code == 200


def test_sigterm_drains_a_request_in_flight(guarded_server, open_server):
    thread, result = _in_background(guarded_server.url, {"input": TEXTS[:3], "encoding_format": "float"})
    time.sleep(0.5)  # accepted, waiting its 1.5 s in the queue
    guarded_server.proc.send_signal(signal.SIGTERM)
    thread.join()
    assert "answer" in result, result
    assert result["answer"].status_code == 200, result["answer"].text
    got = np.array([d["embedding"] for d in result["answer"].json()["data"]])
    np.testing.assert_allclose(got, open_server[1]["plain"][:3], atol=1e-5)
    assert guarded_server.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    assert "stopped, every accepted request answered" in guarded_server.log.read_text()
    with pytest.raises(httpx.TransportError):
        httpx.get(guarded_server.url + "/health")
