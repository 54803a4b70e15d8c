"""The mocker's token model: next token as a pure function of the sequence before it."""

from __future__ import annotations

import math
import random

from services.worker.engines.mocker.token_model import EMPTY_STATE, TokenModel, absorb, absorb_all


def test_absorb_all_equals_one_at_a_time() -> None:
    rng = random.Random(1)
    tokens = [rng.randrange(100_000) for _ in range(500)]
    state = EMPTY_STATE
    for t in tokens:
        state = absorb(state, t)
    assert absorb_all(tokens) == state
    assert absorb_all(tokens[200:], absorb_all(tokens[:200])) == state


def test_draw_is_deterministic_and_in_range() -> None:
    model = TokenModel(32, 127)
    states = [absorb_all([i, i * 3]) for i in range(5000)]
    first = [model.draw(s, False, None) for s in states]
    assert first == [TokenModel(32, 127).draw(s, False, None) for s in states]
    assert all(32 <= t < 127 for t in first)
    assert len(set(first)) == 95  # every printable byte shows up


def test_different_prefixes_give_different_continuations() -> None:
    model = TokenModel(0, 50_000)
    a = model.draw(absorb_all([1, 2, 3]), False, None)
    b = model.draw(absorb_all([1, 2, 4]), False, None)
    c = model.draw(absorb_all([2, 1, 3]), False, None)
    assert len({a, b, c}) == 3


def test_eos_rate_is_one_over_mean() -> None:
    model = TokenModel(32, 127, eos_token_id=3, mean_output_tokens=10)
    draws = [model.draw(absorb_all([i]), True, None) for i in range(20_000)]
    rate = draws.count(3) / len(draws)
    assert 0.085 < rate < 0.115


def test_eos_never_by_chance() -> None:
    # EOS inside the output range, but not allowed here / never configured to fire.
    for model, eos_ok in ((TokenModel(32, 127, 65, 10), False), (TokenModel(32, 127, 65, 0), True)):
        draws = [model.draw(absorb_all([i, 7]), eos_ok, None) for i in range(20_000)]
        assert 65 not in draws


def test_banned_ids_are_redrawn_deterministically() -> None:
    model = TokenModel(32, 40)
    banned = frozenset(range(32, 38))
    draws = [model.draw(absorb_all([i]), False, banned) for i in range(2000)]
    assert set(draws) == {38, 39}
    assert draws == [model.draw(absorb_all([i]), False, banned) for i in range(2000)]


def test_logprobs_rank_the_drawn_token_first_and_repeat() -> None:
    """A proper (sub-)distribution, the drawn token its most likely, distinct alternatives in
    range, and the same figures for the same sequence: a migrated stream's logprobs go on as
    the original's would have."""
    model = TokenModel(32, 127, eos_token_id=3, mean_output_tokens=50)
    for i in range(200):
        state = absorb_all([i, 7])
        token = model.draw(state, True, None)
        lp = model.logprobs(state, token, 5)
        assert lp == model.logprobs(state, token, 5)
        assert lp.top_ids[0] == token and lp.top_logprobs[0] == lp.logprob < 0
        assert len(set(lp.top_ids)) == 5 and all(32 <= t < 127 for t in lp.top_ids[1:])
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
        assert sum(math.exp(v) for v in lp.top_logprobs) <= 1.0
        alone = model.logprobs(state, token, 0)
        assert (alone.logprob, alone.top_ids) == (lp.logprob, [])


def test_prompt_logprobs_are_those_the_model_would_have_drawn_with() -> None:
    """Each prompt token after the first: its logprob after the tokens before it, and the
    model's own top choices there (a token among them gets its figure)."""
    model = TokenModel(32, 127)
    prompt = [72, 101, 108, 108, 111, 32, 119]
    got = model.prompt_logprobs(prompt, 3)
    assert len(got) == len(prompt) - 1 and got == model.prompt_logprobs(prompt, 3)
    state = absorb(EMPTY_STATE, prompt[0])
    for token, lp in zip(prompt[1:], got, strict=True):
        assert lp.top_ids[0] == model.draw(state, False, None) and len(lp.top_ids) == 3
        if token in lp.top_ids:
            assert lp.logprob == lp.top_logprobs[lp.top_ids.index(token)]
            assert lp.rank == lp.top_ids.index(token) + 1
        else:
            assert lp.logprob < lp.top_logprobs[-1] and lp.rank > 3
        state = absorb(state, token)
    # A token's value and rank do not depend on how many alternatives a request lists; the
    # fewer listed are the first of the more.
    for few, many in zip(model.prompt_logprobs(prompt, 1), model.prompt_logprobs(prompt, 20),
                         strict=True):
        assert (few.logprob, few.rank) == (many.logprob, many.rank) and few.rank >= 1
        assert few.top_ids == many.top_ids[:1] and len(many.top_ids) == 20


def test_logit_bias_picks_the_most_likely_token_after_the_bias() -> None:
    """No bias: the drawn token. A bias that lifts an alternative past it, or a token the
    distribution does not name far enough: that one. -100 on the drawn token: the next most
    likely. An excluded token is never picked, whatever its bias."""
    model = TokenModel(32, 127)
    state = absorb(EMPTY_STATE, 72)
    drawn = model.draw(state, False, None)
    named = model.scored(state, drawn, drawn, 3)
    assert named.rank == 1 and named.top_ids[0] == drawn
    none: frozenset[int] = frozenset()
    assert model.biased(state, drawn, {}, none)[0] == drawn
    second, gap = named.top_ids[1], named.top_logprobs[0] - named.top_logprobs[1]
    assert model.biased(state, drawn, {second: gap - 0.01}, none)[0] == drawn
    assert model.biased(state, drawn, {second: gap + 0.01}, none)[0] == second
    assert model.biased(state, drawn, {drawn: -100.0}, none)[0] == second
    unnamed = next(t for t in range(32, 127) if model.scored(state, drawn, t, 0).rank > 21)
    assert model.biased(state, drawn, {unnamed: 100.0}, none)[0] == unnamed
    assert model.biased(state, drawn, {7: 100.0}, none)[0] == 7  # outside the drawn range too
    assert model.biased(state, drawn, {unnamed: 100.0}, frozenset((unnamed,)))[0] == drawn
    # Its logprob stays the model's own, before the bias.
    assert model.scored(state, drawn, second, 0).logprob == named.top_logprobs[1]
    assert model.biased(state, drawn, {second: gap + 0.01}, none, 2) == (
        second, model.scored(state, drawn, second, 2))


def test_allowed_token_ids_pick_the_most_likely_allowed_token() -> None:
    """Allowed tokens the distribution names: the most likely of them (after any bias).
    None named: the first allowed one given, the others being as likely as it."""
    model = TokenModel(32, 127)
    state = absorb(EMPTY_STATE, 72)
    drawn = model.draw(state, False, None)
    named = model.scored(state, drawn, drawn, 20).top_ids
    none: frozenset[int] = frozenset()
    second, third = named[1], named[2]
    assert model.biased(state, drawn, {}, none, allowed=dict.fromkeys([third, second]))[0] \
        == second
    assert model.biased(state, drawn, {}, none, allowed={drawn: None})[0] == drawn
    assert model.biased(state, drawn, {third: 100.0}, none,
                        allowed=dict.fromkeys([second, third]))[0] == third
    # A bias on a token that is not allowed does not let it out.
    assert model.biased(state, drawn, {drawn: 100.0}, none,
                        allowed=dict.fromkeys([second]))[0] == second
    unnamed = [t for t in range(32, 127) if t not in named]
    assert model.biased(state, drawn, {}, none, allowed=dict.fromkeys(unnamed[3:5]))[0] == \
        unnamed[3]
    assert model.biased(state, drawn, {}, frozenset((second,)),
                        allowed=dict.fromkeys([second, unnamed[0]]))[0] == unnamed[0]
    assert model.biased(state, drawn, {unnamed[1]: 1.0}, none,
                        allowed=dict.fromkeys(unnamed[:2]))[0] == unnamed[1]
    # Its logprob is the model's own for the token chosen.
    token, logprob = model.biased(state, drawn, {}, none, 2, dict.fromkeys([third]))
    assert (token, logprob) == (third, model.scored(state, drawn, third, 2))
