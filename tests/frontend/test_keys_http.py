"""API keys and per-key quotas through the real `openai` client, against the app under uvicorn
in front of a fake upstream: 401, 403, 429 with Retry-After and x-ratelimit-* headers, served
again after the wait, concurrent stream caps, revocation by editing the keys file."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from common import prometheus_text
from services.frontend.api_keys import ApiKeys
from services.frontend.app import FrontendApp
from services.frontend.metrics import FrontendMetrics
from services.frontend.quotas import Quotas
from services.frontend.tokenizer import ByteTokenizer
from tests.frontend.fake_upstream import FakeUpstream, Script
from tests.frontend.live_server import LiveServer, wait_until
from tests.openapi_spec import validate

TIMEOUT = 10.0
REPLY = list(b"Simple is better than complex.")
MESSAGES = [{"role": "user", "content": "Zen?"}]
KEYS = [
    {"id": "open", "key": "sk-open"},
    {"id": "tiny-only", "key": "sk-tiny", "models": ["tiny"]},
    {"id": "slow", "key": "sk-slow", "requests_per_second": 1},
    {"id": "two-streams", "key": "sk-two", "max_concurrent_streams": 2},
    {"id": "few-tokens", "key": "sk-few", "tokens_per_minute": 600},
]


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.keys_file = tmp / "keys.json"
        self.keys_file.write_text(json.dumps(KEYS))
        self.keys = ApiKeys(self.keys_file)
        self.fake = FakeUpstream(models=["tiny", "big"],
                                 script=Script(reply=REPLY, stop_token=ByteTokenizer.EOS))
        self.metrics = FrontendMetrics()
        app = FrontendApp(self.fake, ByteTokenizer(), None, 4096, self.metrics,
                          api_keys=self.keys, quotas=Quotas())
        self.server = LiveServer(app).start()

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.url + "/v1", api_key=key, max_retries=0,
                             timeout=TIMEOUT)

    def chat(self, key: str, model: str = "tiny", **kwargs: Any) -> Any:
        return self.client(key).chat.completions.create(model=model, messages=MESSAGES,
                                                        **kwargs)

    def scrape(self) -> prometheus_text.Metrics:
        return prometheus_text.parse(httpx.get(self.server.url + "/metrics",
                                               timeout=TIMEOUT).text)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    yield s
    s.server.stop()


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    validate("ErrorResponse", body)
    return body["error"]


def test_unknown_missing_and_revoked_keys_are_401(stack: Stack) -> None:
    assert stack.chat("sk-open").choices[0].message.content == bytes(REPLY).decode()
    with pytest.raises(openai.AuthenticationError) as unknown:
        stack.chat("sk-nobody")
    assert _error(unknown.value)["code"] == "invalid_api_key"
    response = httpx.post(stack.server.url + "/v1/chat/completions", timeout=TIMEOUT,
                          json={"model": "tiny", "messages": MESSAGES})
    assert response.status_code == 401
    # Revoke 'open' by rewriting the file; the reload (the poll's one step) applies it.
    stack.keys_file.write_text(json.dumps(KEYS[1:]))
    st = stack.keys_file.stat()
    os.utime(stack.keys_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert stack.server.call(stack.keys.reload_if_changed)
    with pytest.raises(openai.AuthenticationError):
        stack.chat("sk-open")
    stack.chat("sk-tiny")


def test_the_tokenizer_endpoints_take_a_key_too(stack: Stack) -> None:
    """/tokenize and /detokenize sit outside /v1/ (as vLLM serves them) and cost tokenizer
    time: a key guards them, and a key's model list holds there too."""
    url = stack.server.url
    assert httpx.post(url + "/tokenize", timeout=TIMEOUT,
                      json={"prompt": "Zen"}).status_code == 401
    assert httpx.post(url + "/detokenize", timeout=TIMEOUT,
                      json={"tokens": [90]}).status_code == 401
    keyed = {"authorization": "Bearer sk-tiny"}
    answer = httpx.post(url + "/tokenize", timeout=TIMEOUT, headers=keyed,
                        json={"prompt": "Zen", "add_special_tokens": False})
    assert answer.json()["tokens"] == list(b"Zen")
    denied = httpx.post(url + "/tokenize", timeout=TIMEOUT, headers=keyed,
                        json={"prompt": "Zen", "model": "big"})
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "model_not_allowed"
    assert httpx.post(url + "/detokenize", timeout=TIMEOUT, headers=keyed,
                      json={"tokens": [90, 101, 110]}).json() == {"prompt": "Zen"}


def test_a_model_outside_the_allow_list_is_403(stack: Stack) -> None:
    stack.chat("sk-tiny", "tiny")
    with pytest.raises(openai.PermissionDeniedError) as denied:
        stack.chat("sk-tiny", "big")
    error = _error(denied.value)
    assert (error["code"], error["param"]) == ("model_not_allowed", "model")
    assert "tiny-only" in error["message"] and "sk-tiny" not in error["message"]
    stack.chat("sk-open", "big")
    assert len(stack.fake.opened) == 2  # the refused request never went upstream
    assert [m.id for m in stack.client("sk-tiny").models.list().data] == ["tiny"]
    assert [m.id for m in stack.client("sk-open").models.list().data] == ["tiny", "big"]
    assert stack.client("sk-open").models.retrieve("big").id == "big"
    with pytest.raises(openai.NotFoundError):  # a model the key may not use is not shown
        stack.client("sk-tiny").models.retrieve("big")
    with pytest.raises(openai.AuthenticationError):
        stack.client("sk-wrong").models.retrieve("tiny")


def test_over_the_request_rate_is_429_then_served_after_retry_after(stack: Stack) -> None:
    raw = stack.client("sk-slow").chat.completions.with_raw_response.create(
        model="tiny", messages=MESSAGES)
    assert raw.headers["x-ratelimit-limit-requests"] == "1"
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    assert raw.headers["x-ratelimit-reset-requests"].endswith(("ms", "s"))
    with pytest.raises(openai.RateLimitError) as limited:
        stack.chat("sk-slow")
    headers = limited.value.response.headers
    error = _error(limited.value)
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert int(headers["retry-after"]) == 1
    wait_ms = int(headers["retry-after-ms"])
    assert 0 < wait_ms <= 1000
    assert headers["x-ratelimit-remaining-requests"] == "0"
    time.sleep(wait_ms / 1000)  # waiting what the server said is enough
    assert stack.chat("sk-slow").choices[0].finish_reason == "stop"
    # Other keys never noticed.
    stack.chat("sk-open")


def test_concurrent_stream_cap(stack: Stack) -> None:
    # ~6 s per full reply: the streams outlive the checks below.
    stack.fake.script = Script(reply=REPLY, delay_s=0.2, stop_token=ByteTokenizer.EOS)
    client = stack.client("sk-two")
    streams = [client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True)
               for _ in range(2)]
    for stream in streams:
        next(iter(stream))  # both are generating
    with pytest.raises(openai.RateLimitError) as capped:
        stack.chat("sk-two")
    assert _error(capped.value)["code"] == "concurrency_limit_exceeded"
    assert capped.value.response.headers["retry-after"] == "1"
    stack.chat("sk-open", max_tokens=2)  # another key is not capped by this one's streams
    streams[0].close()
    gauge = "turnout_frontend_key_active_streams"
    wait_until(lambda: stack.scrape().value(gauge, key_id="two-streams") == 1, TIMEOUT)
    assert stack.chat("sk-two", max_tokens=2).choices[0].finish_reason == "length"
    assert stack.scrape().value(gauge, key_id="two-streams") == 1  # streams[1] still runs
    streams[1].close()
    wait_until(lambda: stack.scrape().value(gauge, key_id="two-streams") == 0, TIMEOUT)


def test_a_request_for_n_completions_holds_n_of_the_keys_streams(stack: Stack) -> None:
    stack.fake.script = Script(reply=REPLY, delay_s=0.2, stop_token=ByteTokenizer.EOS)
    gauge = "turnout_frontend_key_active_streams"
    with pytest.raises(openai.RateLimitError) as never:
        stack.chat("sk-two", n=3)
    assert _error(never.value)["code"] == "request_too_large"
    assert "at most 2" in _error(never.value)["message"]
    stream = stack.client("sk-two").chat.completions.create(model="tiny", messages=MESSAGES,
                                                            stream=True, n=2)
    next(iter(stream))
    assert stack.scrape().value(gauge, key_id="two-streams") == 2
    with pytest.raises(openai.RateLimitError) as capped:
        stack.chat("sk-two", max_tokens=2)
    assert _error(capped.value)["code"] == "concurrency_limit_exceeded"
    stream.close()
    wait_until(lambda: stack.scrape().value(gauge, key_id="two-streams") == 0, TIMEOUT)
    done = stack.chat("sk-two", max_tokens=2, n=2)
    assert [c.finish_reason for c in done.choices] == ["length", "length"]
    assert stack.scrape().value(gauge, key_id="two-streams") == 0


def test_tokens_per_minute(stack: Stack) -> None:
    with pytest.raises(openai.RateLimitError) as too_large:
        stack.client("sk-few").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x" * 700}])
    assert _error(too_large.value)["code"] == "request_too_large"
    assert "retry-after" not in too_large.value.response.headers  # waiting would not help
    raw = stack.client("sk-few").chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "x" * 560}])
    prompt = raw.parse().usage.prompt_tokens
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) <= 600 - prompt
    # The completion's tokens were charged at its end: the bucket is (nearly) empty.
    with pytest.raises(openai.RateLimitError) as limited:
        stack.chat("sk-few")
    error = _error(limited.value)
    assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")
    assert int(limited.value.response.headers["retry-after"]) >= 1
    assert limited.value.response.headers["x-ratelimit-limit-tokens"] == "600"


def test_metrics_name_key_ids_never_keys(stack: Stack) -> None:
    stack.chat("sk-open")
    with pytest.raises(openai.PermissionDeniedError):
        stack.chat("sk-tiny", "big")
    text = httpx.get(stack.server.url + "/metrics", timeout=TIMEOUT).text
    assert "sk-" not in text
    metrics = prometheus_text.parse(text)
    assert metrics.value("turnout_frontend_key_requests_total", key_id="open",
                         status="200") == 1
    assert metrics.value("turnout_frontend_key_requests_total", key_id="tiny-only",
                         status="403") == 1
    assert metrics.value("turnout_frontend_key_rejections_total", key_id="tiny-only",
                         reason="model") == 1
    assert metrics.value("turnout_frontend_key_tokens_total", key_id="open",
                         kind="completion") == len(REPLY) + 1
