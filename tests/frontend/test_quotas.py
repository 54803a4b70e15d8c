"""Per-key quotas on a fake clock: request rate, token rate, concurrent streams, headers."""

from __future__ import annotations

import math

import pytest

from services.frontend.api_keys import KeyPolicy, digest
from services.frontend.quotas import (
    QuotaExceeded,
    Quotas,
    TokenBucket,
    format_duration,
    retry_after_headers,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def policy(key_id: str = "k", rps: float = 0.0, tpm: int = 0, streams: int = 0) -> KeyPolicy:
    return KeyPolicy(key_id, digest(key_id), None, rps, tpm, streams)


def test_bucket_refills_at_its_rate_up_to_capacity() -> None:
    bucket = TokenBucket(10, 2.0, now=0.0)
    assert bucket.take(10, 0.0) == 0.0
    assert bucket.take(1, 0.0) == pytest.approx(0.5)
    assert bucket.take(1, 0.5) == 0.0
    assert bucket.take(11, 0.5) == math.inf
    assert bucket.remaining(100.0) == 10
    bucket.charge(15, 100.0)
    assert bucket.remaining(100.0) == 0
    assert bucket.take(1, 100.0) == pytest.approx(3.0)  # 5 in debt + 1, at 2/s
    assert bucket.reset_s(100.0) == pytest.approx(7.5)


def test_requests_per_second_refuses_then_admits_after_retry_after() -> None:
    clock = Clock()
    quotas = Quotas(clock)
    key = policy(rps=2)
    grants = [quotas.admit(key), quotas.admit(key)]
    with pytest.raises(QuotaExceeded) as refused:
        quotas.admit(key)
    assert refused.value.kind == "requests"
    assert refused.value.retry_after_s == pytest.approx(0.5)
    headers = dict(refused.value.headers)
    assert headers[b"x-ratelimit-limit-requests"] == b"2"
    assert headers[b"x-ratelimit-remaining-requests"] == b"0"
    assert headers[b"x-ratelimit-reset-requests"] == b"1s"
    clock.now += refused.value.retry_after_s
    grants.append(quotas.admit(key))
    for grant in grants:
        grant.release()


def test_concurrent_streams_cap_frees_on_release() -> None:
    quotas = Quotas(Clock())
    key = policy(streams=2)
    a, b = quotas.admit(key), quotas.admit(key)
    with pytest.raises(QuotaExceeded) as refused:
        quotas.admit(key)
    assert refused.value.kind == "streams"
    a.release()
    a.release()  # idempotent: one slot per grant
    c = quotas.admit(key)
    with pytest.raises(QuotaExceeded):
        quotas.admit(key)
    b.release()
    c.release()
    assert quotas.state(key).streams == 0


def test_a_grant_widens_to_the_completions_it_runs() -> None:
    quotas = Quotas(Clock())
    key = policy(streams=3)
    a = quotas.admit(key)
    a.widen(2)
    b = quotas.admit(key)
    with pytest.raises(QuotaExceeded) as busy:
        b.widen(2)
    assert busy.value.retry_after_s is not None  # fits once others finish
    with pytest.raises(QuotaExceeded) as never:
        b.widen(4)
    assert never.value.retry_after_s is None  # more than the key may ever run
    assert (a.streams, b.streams, quotas.state(key).streams) == (2, 1, 3)
    a.release()
    b.widen(3)
    b.release()
    assert quotas.state(key).streams == 0


def test_tokens_per_minute_prompt_up_front_completion_after() -> None:
    clock = Clock()
    quotas = Quotas(clock)
    key = policy(tpm=600)  # 10 tokens/s
    grant = quotas.admit(key)
    grant.take_prompt(400)
    grant.charge_completion(300)  # the bucket goes 100 into debt
    headers = dict(grant.headers())
    assert headers[b"x-ratelimit-remaining-tokens"] == b"0"
    assert headers[b"x-ratelimit-reset-tokens"] == b"1m10s"
    with pytest.raises(QuotaExceeded) as refused:
        grant.take_prompt(50)
    assert refused.value.kind == "tokens"
    assert refused.value.retry_after_s == pytest.approx(15.0)
    clock.now += 15.0
    grant.take_prompt(50)
    with pytest.raises(QuotaExceeded) as too_large:
        grant.take_prompt(601)
    assert too_large.value.retry_after_s is None  # waiting cannot help
    grant.release()


def test_unlimited_key_has_no_headers_and_is_never_refused() -> None:
    quotas = Quotas(Clock())
    key = policy()
    grants = [quotas.admit(key) for _ in range(1000)]
    grants[0].take_prompt(10**9)
    assert grants[0].headers() == []


def test_reload_keeps_state_unless_limits_change() -> None:
    clock = Clock()
    quotas = Quotas(clock)
    key = policy("a", rps=1)
    quotas.admit(key).release()
    quotas.sync([policy("a", rps=1)])
    with pytest.raises(QuotaExceeded):  # same limits: the spent request still counts
        quotas.admit(key)
    quotas.sync([policy("a", rps=5)])
    quotas.admit(policy("a", rps=5)).release()  # new limits: a fresh bucket
    quotas.sync([])
    assert quotas.state(policy("b")).streams == 0


def test_retry_after_rounds_up_and_durations_read_like_openai() -> None:
    assert dict(retry_after_headers(0.2)) == {b"retry-after": b"1", b"retry-after-ms": b"200"}
    assert dict(retry_after_headers(2.01))[b"retry-after"] == b"3"
    assert format_duration(0.02) == "20ms"
    assert format_duration(1.5) == "1.5s"
    assert format_duration(360) == "6m0s"
