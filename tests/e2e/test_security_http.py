"""The frontend as a real process facing hostile HTTP clients: API keys from a file that is
edited while it runs, slowloris and huge bodies cut within their limits while other clients are
served, hostile JSON answered 4xx in bounded time with the process's memory flat, and TLS
through the `openai` client."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from turnout.testing.deployment import Deployment, free_port, wait_for

pytestmark = pytest.mark.e2e

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
MAX_BODY = 4 * 1024 * 1024
MAX_PROMPT = 50_000
KEYS = [{"id": "main", "key": "sk-main"},
        {"id": "revocable", "key": "sk-revocable"},
        {"id": "mock-only", "key": "sk-mock", "models": ["mock"]},
        {"id": "slow", "key": "sk-slow", "requests_per_second": 0.5}]
AUTH = {"authorization": "Bearer sk-main"}
MESSAGES = [{"role": "user", "content": "Say something."}]


@dataclass
class Stack:
    dep: Deployment
    keys_file: Path
    tmp: Path

    @property
    def url(self) -> str:
        return self.dep.url

    def client(self, key: str = "sk-main") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30)

    def chat(self, key: str = "sk-main", **kwargs: Any) -> Any:
        kwargs.setdefault("model", "mock")
        return self.client(key).chat.completions.create(messages=MESSAGES, max_tokens=8,
                                                        **kwargs)

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.dep.frontend.pid}/status").read_text()
        line = next(row for row in status.splitlines() if row.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                   timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("security-http")
    keys_file = tmp / "keys.json"
    keys_file.write_text(json.dumps(KEYS))
    dep = Deployment(tmp)
    failed = True
    try:
        dep.start(workers=1, worker_args=("--speedup-ratio", "0"), frontend_args=(
            "--api-keys-file", str(keys_file), "--api-keys-reload-s", "0.2",
            "--header-timeout-s", str(HEADER_TIMEOUT_S), "--body-timeout-s", str(BODY_TIMEOUT_S),
            "--max-body-bytes", str(MAX_BODY), "--max-prompt-tokens", str(MAX_PROMPT)))
        yield Stack(dep, keys_file, tmp)
        failed = False
    finally:
        dep.stop()
        if failed:
            print(dep.logs())


# --- API keys ---------------------------------------------------------------------------------

def test_keys_401_403_429_and_revocation_by_editing_the_file(stack: Stack) -> None:
    assert stack.chat().choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.AuthenticationError):
        stack.chat("sk-unknown")
    with pytest.raises(openai.PermissionDeniedError):
        stack.chat("sk-mock", model="other")  # not on its allow-list
    stack.chat("sk-slow")
    with pytest.raises(openai.RateLimitError) as limited:
        stack.chat("sk-slow")
    retry_ms = int(limited.value.response.headers["retry-after-ms"])
    assert limited.value.response.headers["retry-after"] in ("1", "2")  # 0.5/s: up to 2 s
    time.sleep(retry_ms / 1000)
    stack.chat("sk-slow")
    # Revoke by rewriting the file atomically; the running frontend picks it up by itself.
    stack.chat("sk-revocable")
    new = stack.keys_file.with_suffix(".new")
    new.write_text(json.dumps([k for k in KEYS if k["id"] != "revocable"]))
    new.replace(stack.keys_file)

    def revoked() -> bool:
        try:
            stack.chat("sk-revocable")
        except openai.AuthenticationError:
            return True
        return False

    wait_for(revoked, 10, "the revoked key to be refused")
    stack.chat()
    metrics = stack.dep.frontend_metrics()
    assert metrics.value("turnout_frontend_key_requests_total", key_id="slow", status="429") == 1
    assert metrics.value("turnout_frontend_api_keys") == len(KEYS) - 1


# --- slow and huge clients --------------------------------------------------------------------

def _served_meanwhile(stack: Stack, until: threading.Event) -> list[float]:
    """Latencies of ordinary requests made while `until` is unset."""
    latencies = []
    while not until.is_set():
        started = time.monotonic()
        stack.chat()
        latencies.append(time.monotonic() - started)
    return latencies


def _slowloris(port: int, cut_after: list[float]) -> None:
    """Send a request's headers one byte a second; record when the server cut us off."""
    request = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n" + b"x-pad: " + b"a" * 100
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sock.settimeout(1.0)
            try:
                sock.recv(4096)  # an answer (the 408) or the close (b""): cut either way
            except TimeoutError:
                continue
            except OSError:
                pass
            break
    cut_after.append(time.monotonic() - started)


def test_slowloris_is_cut_within_the_header_timeout_and_others_are_served(
        stack: Stack) -> None:
    cut_after: list[float] = []
    attackers = [threading.Thread(target=_slowloris, args=(stack.dep.port, cut_after))
                 for _ in range(20)]
    for thread in attackers:
        thread.start()
    done = threading.Event()
    watcher = threading.Thread(target=lambda: ([t.join(30) for t in attackers], done.set()))
    watcher.start()
    latencies = _served_meanwhile(stack, done)
    watcher.join()
    assert len(cut_after) == 20
    assert max(cut_after) < HEADER_TIMEOUT_S + 2.0, cut_after
    # Served as usual all along: quick, never held until the attackers were cut.
    assert latencies and sorted(latencies)[len(latencies) // 2] < 0.5, latencies
    assert max(latencies) < HEADER_TIMEOUT_S, latencies
    refusals = stack.dep.frontend_metrics().value("turnout_frontend_http_limit_refusals_total",
                                                  limit="header_timeout")
    assert refusals >= 20


def _send_body(port: int, head: bytes, chunks: Iterator[bytes]) -> tuple[int, bytes, float]:
    """(body bytes sent before the server answered or cut us off, its answer, seconds). Like an
    HTTP client, stops sending once an answer arrives."""
    started = time.monotonic()
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        answer = b""
        try:
            for chunk in chunks:
                sock.sendall(chunk)
                sent += len(chunk)
                sock.setblocking(False)
                try:
                    answer = sock.recv(65536)
                except BlockingIOError:
                    continue
                finally:
                    sock.setblocking(True)
                break
        except OSError:
            pass
        try:
            while data := sock.recv(65536):  # to the server's half-close
                answer += data
        except OSError:
            pass
    return sent, answer, time.monotonic() - started


def _trickle(size: int, every_s: float) -> Iterator[bytes]:
    while True:
        yield b"x" * size
        time.sleep(every_s)


def test_a_100_mb_body_is_cut_and_others_are_served(stack: Stack) -> None:
    total = 100 * 1024 * 1024
    mib = b"x" * (1024 * 1024)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-main\r\n"
            b"content-type: application/json\r\n")
    before = stack.rss_bytes()
    # Declared: refused from the headers alone.
    sent, answer, seconds = _send_body(stack.dep.port, head + b"content-length: %d\r\n\r\n" % total,
                                       iter([mib] * 100))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < total and seconds < 5
    # Chunked: cut once past the limit.
    sent, answer, seconds = _send_body(
        stack.dep.port, head + b"transfer-encoding: chunked\r\n\r\n",
        (b"%x\r\n%s\r\n" % (len(mib), mib) for _ in range(100)))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < total and seconds < 5
    # Slow: a body under the size limit that does not arrive in time.
    sent, answer, seconds = _send_body(stack.dep.port, head + b"content-length: %d\r\n\r\n"
                                       % (3 * 1024 * 1024), _trickle(1024, every_s=0.2))
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert seconds < BODY_TIMEOUT_S + 2.0
    stack.chat()
    assert stack.rss_bytes() - before < 64 * 1024 * 1024


# --- hostile JSON -----------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def _hostile_bodies() -> dict[str, tuple[str, bytes]]:
    """name → (path, body)."""
    def chat(**fields: Any) -> bytes:
        return json.dumps({"model": "mock", "messages": MESSAGES, **fields}).encode()

    deep = 200_000
    chat_bodies = {
        "oversized": chat(stop="x" * (MAX_BODY + 1)),
        "nested_messages": b'{"model":"mock","messages":' + b"[" * deep + b"]" * deep + b"}",
        "nested_free_form": (b'{"model":"mock","messages":[{"role":"user","content":"x"}],'
                             b'"tools":[{"a":' + b"[" * deep + b"]" * deep + b"}]}"),
        "invalid_utf8": b'{"model":"mock","messages":[{"role":"user","content":"\xff\xfe\xc3"}]}',
        "huge_stop_list": chat(stop=["x"] * 100_000),
        "big_logit_bias": chat(logit_bias={str(i): 1 for i in range(150_000)}),
        # Tokenized (no cheaper way to count its tokens), then over --max-prompt-tokens.
        "many_messages": json.dumps({"model": "mock",
                                     "messages": [{"role": "user", "content": "hi"}] * 20_000
                                     }).encode(),
        "huge_number": chat()[:-1] + b',"seed":' + b"9" * 100_000 + b"}",
        "null_tools": chat(tools=None),
        "not_an_object": b"[" + b"1," * 500_000 + b"1]",
    }
    completion_bodies = {
        "nested_prompt": b'{"model":"mock","prompt":' + b"[" * deep + b"]" * deep + b"}",
        "ids_outside_vocab": json.dumps({"model": "mock",
                                         "prompt": list(range(100_000, 200_000))}).encode(),
        "batched_prompts": json.dumps({"model": "mock", "prompt": ["x"] * 50_000}).encode(),
        "long_prompt": json.dumps({"model": "mock", "prompt": "x" * (MAX_PROMPT + 1)}).encode(),
        "null_user": json.dumps({"model": "mock", "prompt": "x", "user": None}).encode(),
    }
    return {**{name: (CHAT, body) for name, body in chat_bodies.items()},
            **{name: (COMPLETIONS, body) for name, body in completion_bodies.items()}}


def test_hostile_json_is_4xx_in_bounded_time_with_memory_flat(stack: Stack) -> None:
    bodies = _hostile_bodies()
    with httpx.Client(base_url=stack.url, headers=AUTH, timeout=30) as http:
        def round_trip() -> None:
            for name, (path, body) in bodies.items():
                started = time.monotonic()
                try:
                    response = http.post(path, content=body,
                                         headers={"content-type": "application/json"})
                    status = response.status_code
                except httpx.HTTPError:  # cut off mid-upload (the oversized body): fine
                    status = 413
                assert 400 <= status < 500, (name, status)
                assert time.monotonic() - started < 10, name

        round_trip()  # warm-up: allocator pools, lazily built decoders
        before = stack.rss_bytes()
        for _ in range(4):
            round_trip()
        grown = stack.rss_bytes() - before
    assert grown < 64 * 1024 * 1024, f"RSS grew {grown / 2**20:.1f} MiB"
    stack.chat()


# --- TLS --------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_tls_through_the_openai_client(stack: Stack) -> None:
    cert, key = _self_signed(stack.tmp)
    port = free_port()
    tls = stack.dep.spawn("frontend", "frontend-tls", [
        "frontend", "--port", str(port), "--discovery", f"file:{stack.dep.discovery}",
        "--lease-ttl-s", "2", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)])
    record = stack.dep.wait_registered(tls)
    assert record["endpoints"]["http"] == f"https://127.0.0.1:{port}"
    context = ssl.create_default_context(cafile=str(cert))
    url = f"https://127.0.0.1:{port}"
    with httpx.Client(verify=context, timeout=30) as http:
        wait_for(lambda: http.get(url + "/health").status_code == 200, 30, "TLS /health")
        oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", http_client=http,
                            max_retries=0)
        chat = oai.chat.completions.create(model="mock", messages=MESSAGES, max_tokens=5)
        assert chat.usage is not None and chat.usage.completion_tokens >= 1
    with pytest.raises(httpx.HTTPError):  # a client that does not trust the certificate
        httpx.get(url + "/health", timeout=10)
