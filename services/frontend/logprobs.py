"""A choice's token log-probabilities, as the OpenAI API shapes them.

Collects the `TokenLogprob` of every token a choice shows (a hidden stop token has none; a stop
string ends them with the token that completed it; an echoed prompt's come first, its first
token's null, as OpenAI answers: nothing came before it) and renders those not yet sent: a chat
choice's `{"content": [...], "refusal": null}` (each token's text, bytes and top alternatives)
or a text completion's `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`. A token's
text is its bytes as UTF-8, U+FFFD where it holds part of a character (its `bytes` say which);
with vLLM's `return_tokens_as_token_ids` it is `token_id:N` instead (text offsets stay the text's).
Also renders vLLM's `prompt_logprobs` (each prompt token's logprob, rank and alternatives).
Does not own where the log-probabilities come from (the engines) or the response around them.
"""

from __future__ import annotations

from typing import Final

import msgspec

from common.messages import TokenLogprob
from services.frontend.tokenizer import Tokenizer

NULL: Final = b"null"
_FLOOR = -9999.0  # JSON has no -inf; vLLM answers the same
_encode = msgspec.json.encode


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]


class ContentLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[ContentLogprob]
    refusal: None = None


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(msgspec.Struct):
    logprob: float
    rank: int | None  # None: the engine did not say
    decoded_token: str


def token_name(tokenizer: Tokenizer, token_id: int, as_ids: bool) -> tuple[str, bytes]:
    """How logprobs name a token (its text, or vLLM's `token_id:N`) and that name's bytes."""
    if as_ids:
        name = f"token_id:{token_id}"
        return name, name.encode()
    raw = tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), raw


class PromptLogprobs:
    """One choice's vLLM `prompt_logprobs`: the engine's scores of its prompt (on the first
    chunk), rendered with the response."""

    __slots__ = ("_as_ids", "_tokenizer", "_top", "scores")

    def __init__(self, tokenizer: Tokenizer, top: int, as_ids: bool = False) -> None:
        self._tokenizer = tokenizer
        self._top = top
        self._as_ids = as_ids
        self.scores: list[TokenLogprob] | None = None  # those of the tokens after the first

    def json(self, token_ids: list[int]) -> bytes:
        """Per prompt token, null for the first (nothing came before it) and for any the engine
        did not score, else a map from token id to logprob, rank and text, of the prompt's
        token and of the most likely there."""
        given = self.scores or []
        out: list[dict[str, PromptLogprob] | None] = [None] if token_ids else []
        for i, token in enumerate(token_ids[1:]):
            if i >= len(given):
                out.append(None)
                continue
            lp = given[i]
            entry = {str(token): PromptLogprob(max(lp.logprob, _FLOOR), lp.rank or None,
                                               self._name(token))}
            for rank, (alt, value) in enumerate(zip(lp.top_ids[:self._top], lp.top_logprobs,
                                                    strict=False), 1):
                if alt != token:
                    entry[str(alt)] = PromptLogprob(max(value, _FLOOR), rank, self._name(alt))
            out.append(entry)
        return _encode(out)

    def _name(self, token_id: int) -> str:
        return token_name(self._tokenizer, token_id, self._as_ids)[0]


class ChoiceLogprobs:
    """One choice's log-probabilities: `add` as tokens are shown, `take` what is not yet sent."""

    __slots__ = ("_as_ids", "_chat", "_offset", "_pending", "_tokenizer", "_top")

    def __init__(self, tokenizer: Tokenizer, chat: bool, as_ids: bool = False,
                 top: int = 20) -> None:
        self._tokenizer = tokenizer
        self._chat = chat
        self._as_ids = as_ids  # each token named by its id, not its text
        self._top = top  # alternatives shown per token (an echoed prompt's may come with more)
        self._pending: list[tuple[int, TokenLogprob | None]] = []
        self._offset = 0  # a completion's text_offset of the next token

    def add(self, token_ids: list[int], logprobs: list[TokenLogprob]) -> None:
        self._pending.extend(zip(token_ids, logprobs, strict=False))

    def add_prompt(self, token_ids: list[int], logprobs: list[TokenLogprob] | None) -> None:
        """An echoed prompt's tokens, `logprobs` those of all but the first (None: the engine
        gave none, and each is null)."""
        given = logprobs or []
        top = self._top
        if any(len(lp.top_ids) > top for lp in given):
            given = [TokenLogprob(lp.logprob, lp.top_ids[:top], lp.top_logprobs[:top])
                     for lp in given]
        self._pending.extend((token, given[i - 1] if 0 < i <= len(given) else None)
                             for i, token in enumerate(token_ids))

    def take(self) -> bytes:
        """The JSON of what was added since the last `take`."""
        pending, self._pending = self._pending, []
        return self._chat_json(pending) if self._chat else self._completion_json(pending)

    def _text(self, token_id: int) -> tuple[str, bytes]:
        return token_name(self._tokenizer, token_id, self._as_ids)

    def _chat_json(self, pending: list[tuple[int, TokenLogprob | None]]) -> bytes:
        content = []
        for token_id, lp in pending:
            if lp is None:
                continue  # only an echoed prompt's, and chat has no echo
            text, raw = self._text(token_id)
            top = []
            for alt, value in zip(lp.top_ids, lp.top_logprobs, strict=False):
                alt_text, alt_raw = self._text(alt)
                top.append(TopLogprob(alt_text, max(value, _FLOOR), list(alt_raw)))
            content.append(ContentLogprob(text, max(lp.logprob, _FLOOR), list(raw), top))
        return _encode(ChatLogprobs(content))

    def _completion_json(self, pending: list[tuple[int, TokenLogprob | None]]) -> bytes:
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for token_id, lp in pending:
            text, _ = self._text(token_id)
            tokens.append(text)
            offsets.append(self._offset)
            # Offsets count the text, whatever names the token.
            self._offset += len(token_name(self._tokenizer, token_id, False)[0]
                                if self._as_ids else text)
            if lp is None:
                values.append(None)
                tops.append(None)
                continue
            value = max(lp.logprob, _FLOOR)
            values.append(value)
            # logprobs=0 asks for no alternatives: the chosen token's own entry stands alone.
            tops.append({self._text(alt)[0]: max(alt_value, _FLOOR) for alt, alt_value in zip(
                lp.top_ids, lp.top_logprobs, strict=False)} if lp.top_ids else {text: value})
        return _encode(CompletionLogprobs(tokens, values, tops, offsets))
