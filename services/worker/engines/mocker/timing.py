"""How long a simulated engine step takes: Dynamo mocker's polynomials, so the two compare fairly.

Prefill costs only the prompt tokens actually computed in the step (a prefix-cache hit costs
nothing, which is what makes a hit shorten TTFT); decode costs depend on how full the KV pool is.
A step with both pays both. Owns the arithmetic only; dividing by the speed-up ratio and sleeping
is the engine loop's job.
"""

from __future__ import annotations


def prefill_ms(tokens: int) -> float:
    """Model time of prefilling `tokens` uncached prompt tokens in one step."""
    return 4.209989e-7 * tokens * tokens + 0.01518344 * tokens + 16.50142


def decode_ms(kv_usage: float) -> float:
    """Model time of one decode step at KV usage fraction `kv_usage` (used / total blocks)."""
    return -25.74 * kv_usage * kv_usage + 54.01 * kv_usage + 5.74


def step_ms(prefill_tokens: int, decode_tokens: int, kv_usage: float) -> float:
    """Model time of a step that prefills and/or decodes; 0 for an empty step."""
    ms = 0.0
    if prefill_tokens > 0:
        ms += prefill_ms(prefill_tokens)
    if decode_tokens > 0:
        ms += decode_ms(kv_usage)
    return ms
