"""A planner performance file (`turnout planner --profile`) from aiconfigurator's step
estimates, so the planner starts from the layout's engines instead of knowing nothing.

aiconfigurator estimates one prefill step (batch 1) at four prompt lengths around the ISL on the
prefill (or aggregated) workers' parallelism, and one decode step at a few batch sizes up to
twice the layout's batch on the decode (or aggregated) workers' parallelism, at the workload's
mean context (ISL + OSL/2). The planner's step model is fitted to them with its own least
squares: prefill `a·t² + b·t + c`, decode `e + f·n`; the KV-usage terms (g, h) stay 0, as the
estimates hold the context fixed. The file carries coefficients only, no `forward_passes`: they
seed the model until real steps identify it, and are never kept in its fits (an estimate is a
starting point; aiconfigurator's decode figures can be off by 2x).
"""

from __future__ import annotations

from typing import Any

from services.planner.performance_model import least_squares
from turnout.configure.layout import Layout, Pool


def _decode_pool(layout: Layout) -> Pool:
    return layout.pool("decode") or layout.pools[0]


def _prefill_pool(layout: Layout) -> Pool:
    return layout.pool("prefill") or layout.pools[0]


def steps_request(layout: Layout) -> dict[str, Any]:
    """The `estimate` child's request for the steps this file is fitted to."""
    isl, osl = layout.request.isl, layout.request.osl
    tokens = sorted({max(64, isl // 4), max(64, isl // 2), isl, 2 * isl})
    if len(tokens) < 4:
        tokens = sorted({*tokens, 4 * isl, 8 * isl})
    batch = _decode_pool(layout).batch
    batches = sorted({1, max(1, batch // 4), max(1, batch // 2), batch, 2 * batch})
    prefill, decode = _prefill_pool(layout), _decode_pool(layout)
    return {"kind": "steps", "model": layout.request.model, "system": layout.request.system,
            "backend": layout.request.backend,
            "prefill": {"tp": prefill.tp, "pp": prefill.pp, "tokens": tokens},
            "decode": {"tp": decode.tp, "pp": decode.pp, "batches": batches,
                       "context": isl + osl // 2}}


def profile_document(layout: Layout, steps: dict[str, Any]) -> dict[str, Any]:
    """The performance file for `steps` (the child's answer to `steps_request`)."""
    prefill = [(float(t), float(ms)) for t, ms in steps["prefill"]]
    decode = [(float(n), float(ms)) for n, ms in steps["decode"]]
    if len(prefill) < 3 or len(decode) < 2:
        raise ValueError("too few step estimates to fit the planner's model")
    a, b, c = least_squares([[t * t, t, 1.0] for t, _ in prefill], [ms for _, ms in prefill])
    e, f = least_squares([[1.0, n] for n, _ in decode], [ms for _, ms in decode])
    return {
        "prefill_ms": [a, b, c],
        "decode_ms": [e, f, 0.0, 0.0],
        "source": {
            "from": f"aiconfigurator {steps.get('aiconfigurator', '')} estimates "
                    "(turnout configure --seed-profile)",
            "model": layout.request.model, "system": layout.request.system,
            "backend": layout.request.backend, "layout": layout.summary(),
            "prefill_tp": _prefill_pool(layout).tp, "decode_tp": _decode_pool(layout).tp,
            "prefill_steps_ms": [[t, ms] for t, ms in prefill],
            "decode_steps_ms": [[n, ms] for n, ms in decode],
        },
    }
