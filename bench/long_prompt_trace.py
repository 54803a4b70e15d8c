"""Synthetic long-prompt traces with heavy prefix reuse, in Mooncake's JSONL format, for
`bench/kv_routing.py --trace`.

Owns: drawing a workload (prompt lengths, reuse pattern, arrivals) from a seed and writing it as
rows `{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}` where each
hash id stands for 512 tokens (the last one cut to `input_length`), exactly as the Mooncake trace
does; and printing the trace's cache ceilings for a worker count and cache size with
`kv_routing.py`'s own bound functions (an infinite single cache; one pooled LRU cache; one LRU
cache per worker with ideal prefix routing). Does not own replaying a trace (`kv_routing.py`).

Reuse patterns (`--mix`, weights of independent arrival streams merged by time):

- `conversation`: multi-turn sessions. A session may open with a shared system prompt, then a
  first user message (often a pasted document: `--prompt-*` lengths); each later turn appends the
  previous answer and a new message (`--turn-tokens-median`), so every prompt of a session is a
  prefix-extension of its previous one. Sessions start at rate / `--turns-mean`; turns follow
  after an exponential think time (`--think-s`).
- `system-prompt`: a Zipf-popular pool of shared system prompts, each followed by a request's own
  long content (`--prompt-*` lengths).
- `document`: a Zipf-popular pool of long documents (`--prompt-*` lengths), each request one
  document plus its own question (`--question-tokens-median`), behind one shared instruction.

Arrivals are Poisson at `--rate` requests per second of trace time (`--burst-cv` > 1: gamma
inter-arrival gaps of that coefficient of variation, i.e. bursts). `kv_routing.py` divides
timestamps by its `--time-scale`, so it replays at rate x time scale.

    python bench/long_prompt_trace.py --out /tmp/conv.jsonl --requests 800 --rate 2 --seed 1
    python bench/long_prompt_trace.py --out /tmp/docs.jsonl --mix document=0.7,system-prompt=0.3
    python bench/kv_routing.py --trace /tmp/conv.jsonl --window 800 --systems turnout-kv,dynamo-kv

The stats and bound line go to stdout as JSON; the trace to `--out`.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import heapq
import json
import math
import random
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from kv_routing import (  # noqa: E402  (path set up just above)
    ENGINE_NUM_BLOCKS,
    TRACE_BLOCK_TOKENS,
    TraceRow,
    infinite_cache_bound,
    lru_cache_bounds,
)

PATTERNS = ("conversation", "system-prompt", "document")


@dataclasses.dataclass(frozen=True, slots=True)
class TraceShape:
    """Everything a trace is drawn from (lengths in tokens, times in trace seconds)."""

    requests: int = 800
    rate: float = 2.0
    burst_cv: float = 1.0
    mix: tuple[tuple[str, float], ...] = (("conversation", 1.0),)
    prompt_median: int = 6000
    prompt_sigma: float = 1.0
    prompt_min: int = 900
    prompt_max: int = 120_000
    output_tokens: int = 64
    # conversation
    turns_mean: float = 6.0
    turn_tokens_median: int = 1500
    think_s: float = 20.0
    # shared system prompts (conversation, system-prompt) and documents
    system_prompts: int = 8
    system_prompt_tokens: int = 2048
    system_prompt_share: float = 0.5  # conversations that open with a shared system prompt
    documents: int = 200
    question_tokens_median: int = 400
    zipf: float = 1.0
    seed: int = 0

    def check(self) -> None:
        """ValueError naming the first parameter out of range."""
        positive = {"requests": self.requests, "rate": self.rate, "burst_cv": self.burst_cv,
                    "prompt_median": self.prompt_median, "prompt_min": self.prompt_min,
                    "output_tokens": self.output_tokens, "turns_mean": self.turns_mean,
                    "turn_tokens_median": self.turn_tokens_median,
                    "system_prompts": self.system_prompts,
                    "system_prompt_tokens": self.system_prompt_tokens,
                    "documents": self.documents,
                    "question_tokens_median": self.question_tokens_median}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name, value in {"prompt_sigma": self.prompt_sigma, "think_s": self.think_s,
                            "zipf": self.zipf}.items():
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.turns_mean < 1:
            raise ValueError(f"turns_mean must be >= 1, got {self.turns_mean}")
        if self.prompt_max < self.prompt_min:
            raise ValueError(f"prompt_max ({self.prompt_max}) is below prompt_min "
                             f"({self.prompt_min})")
        if not 0 <= self.system_prompt_share <= 1:
            raise ValueError("system_prompt_share must lie in [0, 1]")
        if not self.mix:
            raise ValueError("mix names no pattern")
        for name, weight in self.mix:
            if name not in PATTERNS:
                raise ValueError(f"unknown pattern {name!r} (one of {', '.join(PATTERNS)})")
            if not weight > 0:
                raise ValueError(f"pattern {name!r} needs a weight > 0, got {weight}")


def parse_mix(text: str) -> tuple[tuple[str, float], ...]:
    """`conversation=0.6,document=0.4` (a bare name weighs 1)."""
    out: list[tuple[str, float]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, weight = part.partition("=")
        try:
            out.append((name.strip(), float(weight) if sep else 1.0))
        except ValueError:
            raise ValueError(f"bad weight in {part!r}") from None
    return tuple(out)


class _Ids:
    """Fresh hash ids, one per 512-token block of new content."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, blocks: int) -> list[int]:
        ids = list(range(self.next, self.next + blocks))
        self.next += blocks
        return ids


class _Zipf:
    """Index in [0, n) with P(k) proportional to 1 / (k + 1)^s."""

    def __init__(self, n: int, s: float) -> None:
        total = 0.0
        self.cum: list[float] = []
        for k in range(n):
            total += 1.0 / (k + 1) ** s
            self.cum.append(total)

    def draw(self, rng: random.Random) -> int:
        return min(bisect.bisect_left(self.cum, rng.random() * self.cum[-1]), len(self.cum) - 1)


def _blocks(tokens: int) -> int:
    return -(-tokens // TRACE_BLOCK_TOKENS)


def _whole_blocks(tokens: int) -> int:
    """Shared segments end on a block boundary so what follows them starts a fresh block."""
    return max(1, round(tokens / TRACE_BLOCK_TOKENS))


class _Generator:
    def __init__(self, shape: TraceShape) -> None:
        self.shape = shape
        self.rng = random.Random(shape.seed)
        self.ids = _Ids()
        s = shape
        self.system = [self.ids.take(_whole_blocks(self._lognormal(s.system_prompt_tokens, 0.5)))
                       for _ in range(s.system_prompts)]
        self.system_pick = _Zipf(s.system_prompts, s.zipf)
        self.docs: list[list[int]] = []  # drawn when first asked for
        self.doc_pick = _Zipf(s.documents, s.zipf)
        self.instruction = self.ids.take(1)  # the document pattern's shared lead-in

    def _lognormal(self, median: float, sigma: float) -> int:
        return max(1, round(median * math.exp(sigma * self.rng.gauss(0.0, 1.0))))

    def _prompt_tokens(self) -> int:
        s = self.shape
        return min(s.prompt_max, max(s.prompt_min, self._lognormal(s.prompt_median,
                                                                    s.prompt_sigma)))

    def _gap(self, rate: float) -> float:
        """Seconds to the next arrival of a stream at `rate`, with the shape's burstiness."""
        cv = self.shape.burst_cv
        if cv == 1.0:
            return self.rng.expovariate(rate)
        k = 1.0 / (cv * cv)  # gamma shape for that CV, mean 1 / rate
        return self.rng.gammavariate(k, 1.0 / (k * rate))

    def _row(self, t: float, tokens: int, ids: list[int]) -> dict[str, Any]:
        return {"timestamp": round(t * 1000.0), "input_length": tokens,
                "output_length": self.shape.output_tokens, "hash_ids": ids[:_blocks(tokens)]}

    # -- patterns: each yields rows in time order ----------------------------------------------

    def conversation(self, rate: float) -> Iterator[dict[str, Any]]:
        """Sessions start at rate / turns_mean; their turns interleave with later sessions, so
        rows come out of a heap ordered by time."""
        s = self.shape
        heap: list[tuple[float, int, dict[str, Any]]] = []
        t = 0.0
        n = 0
        stop_p = 1.0 / s.turns_mean  # geometric number of turns with that mean
        while True:
            t += self._gap(rate / s.turns_mean)
            while heap and heap[0][0] <= t:
                yield heapq.heappop(heap)[2]
            history: list[int] = []
            tokens = 0
            if self.rng.random() < s.system_prompt_share:
                history = list(self.system[self.system_pick.draw(self.rng)])
                tokens = len(history) * TRACE_BLOCK_TOKENS
            tokens = min(s.prompt_max, tokens + self._prompt_tokens())
            turn_t = t
            while True:
                need = _blocks(tokens) - len(history)
                if need > 0:
                    history += self.ids.take(need)
                n += 1
                heapq.heappush(heap, (turn_t, n, self._row(turn_t, tokens, history)))
                grown = tokens + self._lognormal(s.turn_tokens_median, 0.7)
                if self.rng.random() < stop_p or grown > s.prompt_max:
                    break
                tokens = grown
                turn_t += s.think_s * self.rng.expovariate(1.0) if s.think_s else 0.0

    def system_prompt(self, rate: float) -> Iterator[dict[str, Any]]:
        s = self.shape
        t = 0.0
        while True:
            t += self._gap(rate)
            head = self.system[self.system_pick.draw(self.rng)]
            tokens = min(s.prompt_max, len(head) * TRACE_BLOCK_TOKENS + self._prompt_tokens())
            yield self._row(t, tokens, head + self.ids.take(_blocks(tokens) - len(head)))

    def document(self, rate: float) -> Iterator[dict[str, Any]]:
        s = self.shape
        t = 0.0
        while True:
            t += self._gap(rate)
            k = self.doc_pick.draw(self.rng)
            while len(self.docs) <= k:
                self.docs.append(self.ids.take(_whole_blocks(self._prompt_tokens())))
            head = self.instruction + self.docs[k]
            question = self._lognormal(s.question_tokens_median, 0.7)
            tokens = min(s.prompt_max, len(head) * TRACE_BLOCK_TOKENS + question)
            yield self._row(t, tokens, head + self.ids.take(max(0, _blocks(tokens) - len(head))))


def generate(shape: TraceShape) -> list[dict[str, Any]]:
    """The first `shape.requests` rows, in time order, of the merged pattern streams."""
    shape.check()
    gen = _Generator(shape)
    total = sum(w for _, w in shape.mix)
    streams = [getattr(gen, name.replace("-", "_"))(shape.rate * w / total)
               for name, w in shape.mix]
    heads: list[dict[str, Any] | None] = [next(s) for s in streams]
    rows: list[dict[str, Any]] = []
    while len(rows) < shape.requests:
        i = min((j for j, h in enumerate(heads) if h is not None),
                key=lambda j: heads[j]["timestamp"])  # type: ignore[index]
        row = heads[i]
        assert row is not None
        rows.append(row)
        heads[i] = next(streams[i])
    return rows


def trace_rows(rows: Sequence[dict[str, Any]]) -> list[TraceRow]:
    return [TraceRow(float(r["timestamp"]), int(r["input_length"]), int(r["output_length"]),
                     list(r["hash_ids"])) for r in rows]


def describe(rows: Sequence[dict[str, Any]], workers: int, blocks_per_worker: int,
             time_scale: float) -> dict[str, Any]:
    """Length statistics and the cache ceilings of `rows` (kv_routing.py's bound functions)."""
    lengths = sorted(r["input_length"] for r in rows)
    n = len(lengths)
    span_s = (rows[-1]["timestamp"] - rows[0]["timestamp"]) / 1000.0
    tr = trace_rows(rows)
    bound = infinite_cache_bound(tr)
    bound.update(lru_cache_bounds(tr, workers, blocks_per_worker))
    return {
        "bench": "long_prompt_trace", "requests": n,
        "input_tokens_p50": lengths[n // 2], "input_tokens_mean": round(sum(lengths) / n),
        "input_tokens_min": lengths[0], "input_tokens_max": lengths[-1],
        "trace_span_s": round(span_s, 1),
        "replay_req_s": round(n / span_s * time_scale, 2) if span_s > 0 else None,
        "replay_input_tok_s": (round(sum(lengths) / span_s * time_scale)
                               if span_s > 0 else None),
        "time_scale": time_scale, "workers": workers, "blocks_per_worker": blocks_per_worker,
        **bound,
    }


def main(argv: Sequence[str] | None = None) -> int:
    d = TraceShape()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="trace file to write (JSONL)")
    p.add_argument("--requests", type=int, default=d.requests)
    p.add_argument("--rate", type=float, default=d.rate,
                   help="requests per second of trace time")
    p.add_argument("--burst-cv", type=float, default=d.burst_cv,
                   help="coefficient of variation of inter-arrival gaps (1: Poisson)")
    p.add_argument("--mix", default="conversation",
                   help=f"pattern weights, e.g. conversation=0.6,document=0.4 "
                        f"(patterns: {', '.join(PATTERNS)})")
    p.add_argument("--prompt-median", type=int, default=d.prompt_median,
                   help="median tokens of a first message / request body / document")
    p.add_argument("--prompt-sigma", type=float, default=d.prompt_sigma,
                   help="log-normal sigma of those lengths")
    p.add_argument("--prompt-min", type=int, default=d.prompt_min)
    p.add_argument("--prompt-max", type=int, default=d.prompt_max,
                   help="no prompt exceeds this (a conversation ends before it would)")
    p.add_argument("--output-tokens", type=int, default=d.output_tokens)
    p.add_argument("--turns-mean", type=float, default=d.turns_mean,
                   help="conversation: mean turns per session (geometric)")
    p.add_argument("--turn-tokens-median", type=int, default=d.turn_tokens_median,
                   help="conversation: median tokens a turn adds (answer + next message)")
    p.add_argument("--think-s", type=float, default=d.think_s,
                   help="conversation: mean trace seconds between a session's turns")
    p.add_argument("--system-prompts", type=int, default=d.system_prompts,
                   help="size of the shared system prompt pool")
    p.add_argument("--system-prompt-tokens", type=int, default=d.system_prompt_tokens,
                   help="median system prompt length")
    p.add_argument("--system-prompt-share", type=float, default=d.system_prompt_share,
                   help="conversation: fraction of sessions opening with a system prompt")
    p.add_argument("--documents", type=int, default=d.documents, help="document pool size")
    p.add_argument("--question-tokens-median", type=int, default=d.question_tokens_median)
    p.add_argument("--zipf", type=float, default=d.zipf,
                   help="popularity exponent of system prompts and documents (0: uniform)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=4, help="for the per-worker cache bound")
    p.add_argument("--blocks-per-worker", type=int, default=ENGINE_NUM_BLOCKS,
                   help="64-token KV blocks per worker, for the cache bounds")
    p.add_argument("--time-scale", type=float, default=10.0,
                   help="the replay's time scale, for the replay rates printed")
    a = p.parse_args(argv)
    try:
        shape = TraceShape(
            requests=a.requests, rate=a.rate, burst_cv=a.burst_cv, mix=parse_mix(a.mix),
            prompt_median=a.prompt_median, prompt_sigma=a.prompt_sigma,
            prompt_min=a.prompt_min, prompt_max=a.prompt_max, output_tokens=a.output_tokens,
            turns_mean=a.turns_mean, turn_tokens_median=a.turn_tokens_median,
            think_s=a.think_s, system_prompts=a.system_prompts,
            system_prompt_tokens=a.system_prompt_tokens,
            system_prompt_share=a.system_prompt_share, documents=a.documents,
            question_tokens_median=a.question_tokens_median, zipf=a.zipf, seed=a.seed)
        rows = generate(shape)
    except ValueError as exc:
        p.error(str(exc))
    if a.workers <= 0 or a.blocks_per_worker <= 0 or a.time_scale <= 0:
        p.error("--workers, --blocks-per-worker and --time-scale must be > 0")
    with a.out.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    info = describe(rows, a.workers, a.blocks_per_worker, a.time_scale)
    print(json.dumps({**info, "trace": str(a.out), "shape": dataclasses.asdict(shape)}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
