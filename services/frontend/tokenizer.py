"""Tokenizers the frontend uses: text and conversations to token ids, and their detokenizers.

Owns `Tokenizer` (the interface the app needs), `ByteTokenizer` (built in, no files: one token per
byte, two specials), `HfTokenizer` (a HF model directory: tokenizer.json, tokenizer_config.json,
generation_config.json, chat template) and `load_tokenizer`. Encoding long text holds the CPU for
a while: callers run it in an executor when the text is longer than `INLINE_TOKENIZE_MAX_CHARS`
(HF encoding here releases the GIL, so the event loop keeps running meanwhile).

Does not own chat template rendering details (`chat_template`) or incremental decoding
(`detokenizer`).
"""

from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Any, Final

import tokenizers

from services.frontend.chat_template import (
    DEFAULT_RENDER,
    ChatTemplate,
    ChatTemplateError,
    RenderOptions,
    find_chat_template,
)
from services.frontend.detokenizer import (
    ByteLevelDetokenizer,
    Detokenizer,
    HfDetokenizer,
    byte_level_table,
    with_special_tokens,
)

# Above this many characters, tokenizing goes to an executor instead of the event loop.
INLINE_TOKENIZE_MAX_CHARS: Final = 2048


class Tokenizer(abc.ABC):
    eos_token_ids: set[int]
    vocab_size: int

    @abc.abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds the model's BOS (or equivalent)."""

    @abc.abstractmethod
    def render_chat(self, messages: list[dict[str, Any]],
                    options: RenderOptions = DEFAULT_RENDER) -> list[int]:
        """The conversation through the chat template (as `options` ask: by default with the
        assistant's header appended), tokenized without adding specials again. Raises
        `ChatTemplateError`."""

    def render_chat_split(self, messages: list[dict[str, Any]], marker: str,
                          options: RenderOptions = DEFAULT_RENDER) -> list[list[int]]:
        """`render_chat`, split where `marker` occurs in the rendered text: the token ids of
        each piece (the images of a chat request go between them)."""
        raise ChatTemplateError("this tokenizer cannot place images in a prompt")

    @abc.abstractmethod
    def decode(self, token_ids: list[int]) -> str:
        """All of `token_ids` as text, special tokens skipped."""

    @abc.abstractmethod
    def new_detokenizer(self, skip_special: bool = True) -> Detokenizer:
        """A fresh incremental decoder for one generated stream; `skip_special` False shows each
        special token as its text."""

    @abc.abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """One token's own bytes (a special token's: its text), as logprobs show it."""


def _calls_text(message: dict[str, Any]) -> str:
    """An assistant's earlier tool calls as the built-in template writes them (the `hermes`
    syntax)."""
    return "".join("<tool_call>" + json.dumps({"name": call["function"]["name"],
                                               "arguments": call["function"]["arguments"]},
                                              ensure_ascii=False) + "</tool_call>"
                   for call in message.get("tool_calls", ()))


class ByteTokenizer(Tokenizer):
    """Built-in: token id = byte value 0..255, plus 256 `<|bos|>` and 257 `<|eos|>`."""

    BOS: Final = 256
    EOS: Final = 257

    def __init__(self) -> None:
        self.eos_token_ids = {self.EOS}
        self.vocab_size = 258

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.BOS, *ids] if add_special_tokens else ids

    def render_chat(self, messages: list[dict[str, Any]],
                    options: RenderOptions = DEFAULT_RENDER) -> list[int]:
        return [self.BOS, *self._chat_text(messages, options).encode("utf-8")]

    def render_chat_split(self, messages: list[dict[str, Any]], marker: str,
                          options: RenderOptions = DEFAULT_RENDER) -> list[list[int]]:
        pieces = [list(p.encode("utf-8"))
                  for p in self._chat_text(messages, options).split(marker)]
        pieces[0].insert(0, self.BOS)
        return pieces

    @staticmethod
    def _chat_text(messages: list[dict[str, Any]], options: RenderOptions) -> str:
        """The built-in template (it reads no variables: `chat_template_kwargs` change nothing
        here, as with any template that does not use them)."""
        text = "".join(f"<|{m['role']}|>\n{m['content']}{_calls_text(m)}\n" for m in messages)
        if options.tools is not None:
            text = f"<|tools|>\n{json.dumps(options.tools, ensure_ascii=False)}\n{text}"
        if options.continue_final_message:
            if not messages or not messages[-1]["content"]:
                raise ChatTemplateError("continue_final_message needs a final message with text")
            return text[:-1]
        return text + "<|assistant|>\n" if options.add_generation_prompt else text

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")

    def new_detokenizer(self, skip_special: bool = True) -> Detokenizer:
        return ByteLevelDetokenizer(_BYTE_TABLE if skip_special else _BYTE_TABLE_SPECIAL)

    def token_bytes(self, token_id: int) -> bytes:
        # Its specials show no text in logprobs (an echoed prompt's tokens add up to its text).
        return bytes((token_id,)) if 0 <= token_id < 256 else b""


# The byte tokenizer's ids as bytes: without its specials' text, and with it.
_BYTE_TABLE: Final = [bytes((b,)) for b in range(256)] + [b"", b""]
_BYTE_TABLE_SPECIAL: Final = [*_BYTE_TABLE[:256], b"<|bos|>", b"<|eos|>"]


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class HfTokenizer(Tokenizer):
    """A HF model directory's fast tokenizer (tokenizer.json) and chat template."""

    def __init__(self, model_dir: str | Path) -> None:
        directory = Path(model_dir)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"{directory} has no tokenizer.json")
        self._tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self._byte_table = byte_level_table(self._tokenizer)
        self._byte_table_special = None if self._byte_table is None else with_special_tokens(
            self._byte_table, self._tokenizer)

        config = _read_json(directory / "tokenizer_config.json")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        eos = set()
        if self.eos_token is not None and (eos_id := self._tokenizer.token_to_id(self.eos_token)) \
                is not None:
            eos.add(eos_id)
        eos.update(_ids(_read_json(directory / "generation_config.json").get("eos_token_id")))
        eos.update(_ids(_read_json(directory / "config.json").get("eos_token_id")))
        self.eos_token_ids = eos

        source = find_chat_template(directory, config)
        self._template = None if source is None else ChatTemplate(source, {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": _token_text(config.get("pad_token")) or "",
            "unk_token": _token_text(config.get("unk_token")) or "",
        })

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch_fast skips offsets and releases the GIL; plain encode does neither.
        return self._tokenizer.encode_batch_fast([text], add_special_tokens=add_special_tokens)[
            0].ids

    def render_chat(self, messages: list[dict[str, Any]],
                    options: RenderOptions = DEFAULT_RENDER) -> list[int]:
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        return self.encode(self._template.render(messages, options), add_special_tokens=False)

    def render_chat_split(self, messages: list[dict[str, Any]], marker: str,
                          options: RenderOptions = DEFAULT_RENDER) -> list[list[int]]:
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        pieces = self._template.render(messages, options).split(marker)
        return [self.encode(p, add_special_tokens=False) if p else [] for p in pieces]

    def decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)

    def new_detokenizer(self, skip_special: bool = True) -> Detokenizer:
        table = self._byte_table if skip_special else self._byte_table_special
        if table is not None:
            return ByteLevelDetokenizer(table)
        return HfDetokenizer(self._tokenizer, skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        table = self._byte_table
        if table is not None and 0 <= token_id < len(table) and table[token_id]:
            return table[token_id]
        return self._tokenizer.decode([token_id], skip_special_tokens=False).encode()


def load_tokenizer(model: str | None) -> Tokenizer:
    """None or "" → the byte tokenizer; a model directory → its HF tokenizer."""
    if not model:
        return ByteTokenizer()
    path = Path(model)
    if path.is_dir():
        return HfTokenizer(path)
    raise ValueError(f"cannot load a tokenizer for {model!r}: not a local model directory "
                     "(give a directory holding tokenizer.json, or no model for the byte "
                     "tokenizer)")
