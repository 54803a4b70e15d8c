"""Reasoning in a model's output: the thinking a reasoning model writes before its answer, split
from the answer as the text streams.

`--reasoning-parser` names how the served model marks its thinking. `deepseek_r1` (DeepSeek-R1,
QwQ) and `qwen3` (Qwen3 and its thinking models) both close it with `</think>`, and may open it
with `<think>` or leave that to the chat template, which writes it into the prompt. So, as vLLM
splits a reply, everything before `</think>` is reasoning (`<think>` tags dropped) and the rest
the answer; a reply that never closes its thinking is all reasoning. For `qwen3` a `<tool_call>`
also ends the thinking (the call is the answer's), and a request whose `chat_template_kwargs`
turn `enable_thinking` off is all answer. `glm45` (or `glm47`: GLM-4.5 to 4.7) reads a reply
as `qwen3` does, its thinking turned off by `thinking` or `enable_thinking`; so does `kimi_k2`
(Kimi K2 Thinking), whose calls section ends the thinking. `deepseek_v3`
(DeepSeek-V3.1 and later, which think only when asked) reads a reply as `deepseek_r1` does
when the request's `chat_template_kwargs` turn `thinking` (or `enable_thinking`) on, else as
all answer.

Owns the split; not the wire shape (`responses`, `responses_api`).
"""

from __future__ import annotations

from typing import Any, Final

from services.frontend.tool_calls import KIMI_CALLS_TAG, TOOL_CALL_TAG, tag_start

_GLM: Final = ("glm45", "glm47")
PARSERS: Final = ("deepseek_r1", "deepseek_v3", *_GLM, "kimi_k2", "qwen3")
# Those whose tool call also ends the thinking, and the tag that opens it.
_CALLS_END: Final = {**dict.fromkeys((*_GLM, "qwen3"), TOOL_CALL_TAG),
                     "kimi_k2": KIMI_CALLS_TAG}
# Those whose thinking tags some models make special tokens (GLM's): as vLLM does, a reply
# split by them keeps its special tokens' text, else the thinking would never be seen to end.
READS_SPECIAL_TOKENS: Final = (*_GLM, "kimi_k2", "qwen3")
_START: Final = "<think>"
_END: Final = "</think>"


def thinks(parser: str, template_kwargs: dict[str, Any] | None) -> bool:
    """Whether a reply under `parser` starts in its thinking: a qwen3, glm45 or kimi_k2 request
    may turn it off through the chat template, a deepseek_v3 one must turn it on there."""
    kwargs = template_kwargs or {}
    if parser == "deepseek_v3":
        return bool(kwargs.get("thinking") or kwargs.get("enable_thinking"))
    if parser in (*_GLM, "kimi_k2"):  # on unless asked off, by either name
        asked = [kwargs.get(name) for name in ("thinking", "enable_thinking")]
        return all(value is None for value in asked) or any(map(bool, asked))
    return not (parser == "qwen3" and kwargs.get("enable_thinking") is False)


class ReasoningText:
    """One reply's text in pieces: `feed` returns the answer to show now and keeps the
    reasoning, handed over by `take` (when `keep`: vLLM's `include_reasoning`), all of it in
    `whole`; `end` flushes what was held back once the text is complete."""

    __slots__ = ("_ends", "_held", "_keep", "_pending", "_thinking", "_whole", "read")

    def __init__(self, parser: str, thinking: bool = True, keep: bool = True) -> None:
        self._ends = (_END, _CALLS_END[parser]) if parser in _CALLS_END else (_END,)
        self._thinking = thinking
        self._keep = keep
        self._held = ""  # a marker possibly split across pieces
        self._pending: list[str] = []
        self._whole: list[str] = []
        self.read = 0  # characters of reasoning read (kept or not)

    @property
    def thinking(self) -> bool:
        """Whether the text is still in its thinking."""
        return self._thinking

    @property
    def whole(self) -> str | None:
        """All the reasoning read (None: none, or not kept)."""
        return "".join(self._whole) or None

    def take(self) -> str:
        """The reasoning read since the last `take`."""
        out = "".join(self._pending)
        self._pending.clear()
        return out

    def feed(self, text: str) -> str:
        if not self._thinking or not text:
            return text
        text = self._held + text
        self._held = ""
        found = [(at, marker) for marker in self._ends if (at := text.find(marker)) >= 0]
        if found:
            at, marker = min(found)
            self._reason(text[:at])
            self._thinking = False
            # A tool call that ends the thinking is the answer's; the closing tag is no one's.
            return text[at + len(_END):] if marker == _END else text[at:]
        cut = min(tag_start(text, marker) for marker in (*self._ends, _START))
        self._reason(text[:cut])
        self._held = text[cut:]
        return ""

    def end(self) -> None:
        held, self._held = self._held, ""
        if self._thinking:
            self._reason(held)

    def _reason(self, text: str) -> None:
        text = text.replace(_START, "")
        self.read += len(text)
        if text and self._keep:
            self._pending.append(text)
            self._whole.append(text)

