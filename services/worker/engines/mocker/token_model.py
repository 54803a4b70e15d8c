"""The mocker's "model": which token comes next, as a pure function of the tokens before it.

A rolling 64-bit hash absorbs the sequence one token at a time (O(1) per token), and the next token
is drawn from a finalised copy of that state. So output depends only on prompt + tokens generated
so far: not on worker, timing, batch or sampling parameters, which is what lets a migrated request
continue exactly where the original stopped. The only parameter-dependent twists are the ones a
real sampler has too: EOS (drawn with probability 1/mean when allowed) and stop tokens banned
before `min_tokens`, and a request's `logit_bias` (the most likely token once the bias is added
to the distribution's logits). Log-probabilities (`logprobs`) are a pure function of the same
state too: the drawn token is always the most likely one, as under greedy sampling.

Owns token choice only; when a request finishes is the scheduler's call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from common.messages import TokenLogprob

_M64 = (1 << 64) - 1
_OFFSET = 0xCBF29CE484222325  # FNV-1a offset basis
_PRIME = 0x100000001B3  # FNV-1a prime
_GOLDEN = 0x9E3779B97F4A7C15
_MAX_REDRAWS = 64
_LOGPROB_SALT = 0x5851F42D4C957F2D  # a second stream of draws from the same state
_UNIT = 1.0 / (1 << 32)

EMPTY_STATE = _OFFSET
# Tokens a prompt position's distribution names (the most any request lists, and the drawn one).
PROMPT_LISTED = 21


def absorb(state: int, token: int) -> int:
    """The rolling state after one more token."""
    return ((state ^ token) * _PRIME) & _M64


def absorb_all(tokens: Iterable[int], state: int = EMPTY_STATE) -> int:
    """The rolling state after a whole sequence (same result as absorbing one by one)."""
    for t in tokens:
        state = ((state ^ t) * _PRIME) & _M64
    return state


def _scored(full: TokenLogprob, rest: float, token: int, top: int) -> TokenLogprob:
    """`token` in a distribution (`TokenModel._distribution`): its value, its rank, and the
    `top` most likely."""
    try:
        rank = full.top_ids.index(token) + 1
        value = full.top_logprobs[rank - 1]
    except ValueError:  # unnamed: all tie, below every named one
        value, rank = rest, len(full.top_ids) + 1
    return TokenLogprob(value, full.top_ids[:top], full.top_logprobs[:top], rank)


def _finalise(x: int) -> int:
    # splitmix64's finaliser: spreads every state bit over the whole word.
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class TokenModel:
    """Draws output ids from [lo, hi), plus EOS with probability 1/mean_output_tokens."""

    __slots__ = ("_eos_cut", "eos_token_id", "lo", "span")

    def __init__(self, lo: int, hi: int, eos_token_id: int | None = None,
                 mean_output_tokens: int = 0) -> None:
        assert 0 <= lo < hi, (lo, hi)
        self.lo = lo
        self.span = hi - lo
        self.eos_token_id = eos_token_id
        # EOS fires when the low 32 bits of the draw fall under this cut: P = 1/mean.
        self._eos_cut = (1 << 32) // mean_output_tokens if (
            eos_token_id is not None and mean_output_tokens > 0) else 0

    @property
    def emits_eos(self) -> bool:
        return self._eos_cut > 0

    def draw(self, state: int, eos_ok: bool, banned: frozenset[int] | None) -> int:
        """The next token after the sequence whose rolling state is `state`.

        `eos_ok`: EOS may be chosen here. `banned`: ids that must not come out (stop tokens while
        `min_tokens` is not reached); they are redrawn deterministically.
        """
        x = _finalise(state)
        if eos_ok and (x & 0xFFFFFFFF) < self._eos_cut:
            return self.eos_token_id  # type: ignore[return-value]
        tok = self.lo + (x >> 32) % self.span
        if tok == self.eos_token_id:
            # EOS only ever comes from the 1/mean branch above, never by chance.
            tok = self.lo + (tok - self.lo + 1) % self.span
        if banned is not None and tok in banned:
            for _ in range(_MAX_REDRAWS):
                x = _finalise((x + _GOLDEN) & _M64)
                tok = self.lo + (x >> 32) % self.span
                if tok not in banned and tok != self.eos_token_id:
                    break
        return tok

    def logprobs(self, state: int, token: int, top: int) -> TokenLogprob:
        """`token`'s log-probability after the sequence whose rolling state is `state` (the
        state `draw` chose it from), and the `top` most likely tokens there, `token` first.

        The drawn token gets probability 0.5-0.99; the others split what is left, each a
        0.2-0.7 share of what the ones before it left, so the probabilities sum to at most 1."""
        x = _finalise(state ^ _LOGPROB_SALT)
        p = 0.5 + 0.49 * (x & 0xFFFFFFFF) * _UNIT
        chosen = math.log(p)
        if top <= 0:
            return TokenLogprob(chosen)
        ids = [token]
        probs = [p]
        left = 1.0 - p
        seen = {token, self.eos_token_id}
        for _ in range(min(top - 1, self.span - 1) * 4):  # a clash is redrawn; rarely twice
            if len(ids) == top:
                break
            x = _finalise((x + _GOLDEN) & _M64)
            alt = self.lo + (x >> 32) % self.span
            if alt in seen:
                continue
            seen.add(alt)
            share = left * (0.2 + 0.5 * (x & 0xFFFFFFFF) * _UNIT)
            left -= share
            ids.append(alt)
            probs.append(share)
        order = sorted(range(1, len(ids)), key=probs.__getitem__, reverse=True)
        return TokenLogprob(chosen, [token, *(ids[i] for i in order)],
                            [chosen, *(math.log(probs[i]) for i in order)])

    def _distribution(self, state: int, drawn: int) -> tuple[TokenLogprob, float]:
        """The distribution at `state` whose most likely token is `drawn`: the `PROMPT_LISTED`
        tokens it names (most likely first) and the logprob each other token has (all alike)."""
        full = self.logprobs(state, drawn, PROMPT_LISTED)
        left = max(1e-12, 1.0 - sum(math.exp(v) for v in full.top_logprobs))
        return full, math.log(left / max(1, self.span - len(full.top_ids)))

    def scored(self, state: int, drawn: int, token: int, top: int) -> TokenLogprob:
        """`token`'s logprob and rank at `state` (where `drawn` is the most likely), with the
        `top` most likely tokens there. The same whatever `top` is."""
        return _scored(*self._distribution(state, drawn), token, top)

    def biased(self, state: int, drawn: int, bias: dict[int, float], excluded: frozenset[int],
               top: int = -1, allowed: dict[int, None] | None = None,
               ) -> tuple[int, TokenLogprob | None]:
        """The most likely token at `state` once `bias` is added to the logits (OpenAI's
        `logit_bias`), never one of `excluded` and, given `allowed` (vLLM's
        `allowed_token_ids`), one of those; `drawn` is the one `draw` chose there. With `top`
        >= 0, also that token `scored` (its logprob the model's own, before the bias)."""
        full, rest = self._distribution(state, drawn)
        barred = excluded
        if allowed is not None:
            barred = excluded | {t for t in full.top_ids if t not in allowed}
        best, best_score = drawn, -math.inf
        for token, value in zip(full.top_ids, full.top_logprobs, strict=True):
            score = value + bias.get(token, 0.0)
            if score > best_score and token not in barred:
                best, best_score = token, score
        named = full.top_ids
        for token, shift in bias.items():
            if (rest + shift > best_score and token not in barred and token not in named
                    and (allowed is None or token in allowed)):
                best, best_score = token, rest + shift
        if allowed is not None and rest > best_score:
            # Every other token is as likely as the next: the first allowed one left wins.
            for token in allowed:
                if token not in named and token not in bias and token not in barred:
                    best = token
                    break
        return best, _scored(full, rest, best, top) if top >= 0 else None

    def prompt_logprobs(self, tokens: list[int], top: int) -> list[TokenLogprob]:
        """Each of `tokens` after the first as `scored` at its position: what this model would
        have drawn there after the ones before."""
        out = []
        state = absorb(EMPTY_STATE, tokens[0]) if tokens else EMPTY_STATE
        for token in tokens[1:]:
            out.append(self.scored(state, self.draw(state, False, None), token, top))
            state = absorb(state, token)
        return out
