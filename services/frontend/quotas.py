"""Per-key quotas: requests per second, tokens per minute and concurrent streams.

Each limited key has token buckets: requests (capacity max(1, rate): one second's burst, refilled
at `requests_per_second`) and tokens (capacity `tokens_per_minute`, refilled at a sixtieth of it
per second). A request takes one request token when it arrives and a stream slot for as long as
it runs; its prompt tokens are taken once it is tokenized (refused when the bucket holds fewer)
and its completion tokens when it ends (the bucket may go below zero, delaying the key's next
requests: a generation's length is not known when it starts). A refusal is a `QuotaExceeded`
carrying when to retry. State survives a keys-file reload unless the key's limits changed.

Clock injectable (monotonic seconds). Does not own keys (`api_keys`) or HTTP (`app`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Final

from services.frontend.api_keys import KeyPolicy

Clock = Callable[[], float]
# Retry-After when a stream slot is what is missing: slots free as generations end.
STREAM_RETRY_S: Final = 1.0


class TokenBucket:
    __slots__ = ("capacity", "level", "rate", "updated")

    def __init__(self, capacity: float, rate_per_s: float, now: float) -> None:
        self.capacity = capacity
        self.rate = rate_per_s
        self.level = capacity
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, amount: float, now: float) -> float:
        """Take `amount` if the bucket holds it: 0.0; else the seconds until it will (nothing
        taken; inf when it never can)."""
        self._refill(now)
        if self.level >= amount:
            self.level -= amount
            return 0.0
        if amount > self.capacity:
            return math.inf
        return (amount - self.level) / self.rate

    def charge(self, amount: float, now: float) -> None:
        """Take `amount` whatever the level (work already done)."""
        self._refill(now)
        self.level -= amount

    def remaining(self, now: float) -> int:
        self._refill(now)
        return max(0, int(self.level))

    def reset_s(self, now: float) -> float:
        """Seconds until the bucket is full again."""
        self._refill(now)
        return max(0.0, (self.capacity - self.level) / self.rate)


class QuotaExceeded(Exception):
    """A request over its key's quota. `retry_after_s` is None when waiting cannot help."""

    def __init__(self, kind: str, message: str, retry_after_s: float | None,
                 headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(message)
        self.kind = kind  # "requests", "tokens" or "streams"
        self.message = message
        self.retry_after_s = retry_after_s
        self.headers = headers


class KeyState:
    """The buckets and stream count of one key."""

    __slots__ = ("policy", "requests", "streams", "tokens")

    def __init__(self, policy: KeyPolicy, now: float) -> None:
        self.policy = policy
        rps, tpm, _ = policy.limits()
        self.requests = TokenBucket(max(1.0, rps), rps, now) if rps > 0 else None
        self.tokens = TokenBucket(float(tpm), tpm / 60.0, now) if tpm > 0 else None
        self.streams = 0


def format_duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: "20ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s"


class Grant:
    """A request admitted under a key: holds its stream slots (one per completion it asks
    for) until `release`."""

    __slots__ = ("_quotas", "_released", "state", "streams")

    def __init__(self, quotas: Quotas, state: KeyState) -> None:
        self._quotas = quotas
        self.state = state
        self.streams = 1
        self._released = False

    @property
    def key_id(self) -> str:
        return self.state.policy.key_id

    def take_prompt(self, prompt_tokens: int) -> None:
        self._quotas.take_prompt(self.state, prompt_tokens)

    def widen(self, streams: int) -> None:
        """Hold `streams` slots in all (a request for n completions runs n generations), or
        `QuotaExceeded`."""
        more = streams - self.streams
        if more > 0:
            self._quotas.take_streams(self.state, more, streams)
            self.streams = streams

    def charge_completion(self, completion_tokens: int) -> None:
        bucket = self.state.tokens
        if bucket is not None and completion_tokens:
            bucket.charge(completion_tokens, self._quotas.clock())

    def headers(self) -> list[tuple[bytes, bytes]]:
        return self._quotas.headers(self.state)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.state.streams -= self.streams


class Quotas:
    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self._states: dict[str, KeyState] = {}

    def sync(self, policies: Iterable[KeyPolicy]) -> None:
        """After a keys reload: new keys get fresh buckets, changed limits too; a removed key's
        state goes (its running requests keep their own reference)."""
        now = self.clock()
        fresh: dict[str, KeyState] = {}
        for policy in policies:
            state = self._states.get(policy.key_id)
            if state is None or state.policy.limits() != policy.limits():
                state = KeyState(policy, now)
            else:
                state.policy = policy
            fresh[policy.key_id] = state
        self._states = fresh

    def state(self, policy: KeyPolicy) -> KeyState:
        state = self._states.get(policy.key_id)
        if state is None or state.policy.limits() != policy.limits():
            state = self._states[policy.key_id] = KeyState(policy, self.clock())
        return state

    def admit(self, policy: KeyPolicy) -> Grant:
        """A stream slot and one request token for a new request, or `QuotaExceeded`."""
        state = self.state(policy)
        cap = policy.max_concurrent_streams
        if cap and state.streams >= cap:
            raise QuotaExceeded(
                "streams", f"Too many concurrent requests for key '{policy.key_id}': limit "
                f"{cap} in flight. Retry when one finishes.", STREAM_RETRY_S,
                self.headers(state))
        if state.requests is not None:
            wait = state.requests.take(1.0, self.clock())
            if wait:
                raise QuotaExceeded(
                    "requests", f"Rate limit reached for key '{policy.key_id}' on requests per "
                    f"second: limit {policy.requests_per_second:g}/s. Please try again in "
                    f"{format_duration(wait)}.", wait, self.headers(state))
        state.streams += 1
        return Grant(self, state)

    def take_streams(self, state: KeyState, more: int, total: int) -> None:
        """`more` slots on top of those the request holds (`total` in all), or
        `QuotaExceeded`."""
        policy = state.policy
        cap = policy.max_concurrent_streams
        if not cap or state.streams + more <= cap:
            state.streams += more
            return
        if total > cap:
            raise QuotaExceeded(
                "streams", f"The request asks for {total} completions; key '{policy.key_id}' "
                f"may run at most {cap} at once. Ask for fewer.", None, self.headers(state))
        raise QuotaExceeded(
            "streams", f"Too many concurrent requests for key '{policy.key_id}': limit {cap} "
            f"generations in flight; this request asks for {total}. Retry when some finish.",
            STREAM_RETRY_S, self.headers(state))

    def take_prompt(self, state: KeyState, prompt_tokens: int) -> None:
        bucket = state.tokens
        if bucket is None:
            return
        policy = state.policy
        wait = bucket.take(prompt_tokens, self.clock())
        if wait == math.inf:
            raise QuotaExceeded(
                "tokens", f"Request too large for key '{policy.key_id}' on tokens per minute: "
                f"limit {policy.tokens_per_minute}, requested {prompt_tokens}. Send a shorter "
                "prompt.", None, self.headers(state))
        if wait:
            raise QuotaExceeded(
                "tokens", f"Rate limit reached for key '{policy.key_id}' on tokens per minute: "
                f"limit {policy.tokens_per_minute}, requested {prompt_tokens}. Please try again "
                f"in {format_duration(wait)}.", wait, self.headers(state))

    def headers(self, state: KeyState) -> list[tuple[bytes, bytes]]:
        """The `x-ratelimit-*` headers OpenAI clients read, for the limited buckets."""
        now = self.clock()
        out: list[tuple[bytes, bytes]] = []
        for kind, bucket in (("requests", state.requests), ("tokens", state.tokens)):
            if bucket is None:
                continue
            out += [(b"x-ratelimit-limit-" + kind.encode(), b"%d" % int(bucket.capacity)),
                    (b"x-ratelimit-remaining-" + kind.encode(), b"%d" % bucket.remaining(now)),
                    (b"x-ratelimit-reset-" + kind.encode(),
                     format_duration(bucket.reset_s(now)).encode())]
        return out


def retry_after_headers(seconds: float) -> list[tuple[bytes, bytes]]:
    """`Retry-After` (whole seconds, rounded up, as HTTP requires) and `retry-after-ms` (which
    the openai client prefers)."""
    return [(b"retry-after", b"%d" % max(1, math.ceil(seconds))),
            (b"retry-after-ms", b"%d" % max(1, math.ceil(seconds * 1000)))]
