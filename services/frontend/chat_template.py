"""Chat templates: finding a model's Jinja template and rendering messages with it.

Owns the sandboxed Jinja environment (with the helpers HF-style templates expect:
`raise_exception`, `strftime_now`, a non-ASCII-escaping `tojson`) and the lookup of the template in
a model directory (chat_template.jinja, then tokenizer_config.json's `chat_template`, which may be a
string or a list of named templates), and how a request asks for its conversation rendered
(`RenderOptions`: vLLM's `add_generation_prompt`, `continue_final_message` and
`chat_template_kwargs`, and the request's `tools`). Does not tokenize; `tokenizer` does.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template refused the conversation, or the model has no usable template."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    return env


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """How one request asks for its conversation rendered."""

    add_generation_prompt: bool = True  # the assistant's header after the last message
    # The last message left open, for the model to go on with (an assistant's prefill).
    continue_final_message: bool = False
    variables: Mapping[str, Any] = field(default_factory=dict)  # chat_template_kwargs
    tools: list[dict[str, Any]] | None = None  # the functions the model may call


DEFAULT_RENDER: Final = RenderOptions()


def continue_final(rendered: str, content: str) -> str:
    """`rendered` cut just after the final message's `content`, so the model continues it
    rather than starting a turn (templates often trim a message: its trimmed text is sought,
    and any trailing whitespace it kept stays)."""
    stripped = content.strip()
    at = rendered.rfind(stripped) if stripped else -1
    if at < 0:
        raise ChatTemplateError("continue_final_message needs a final message with text that "
                                "the chat template shows as it was sent")
    kept = content.lstrip()
    return rendered[:at + (len(kept) if rendered.startswith(kept, at) else len(stripped))]


class ChatTemplate:
    """A compiled template plus the variables every render gets (bos_token, eos_token, ...)."""

    def __init__(self, source: str, variables: dict[str, Any] | None = None) -> None:
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template does not compile: {exc}") from exc
        self._variables = dict(variables or {})

    def render(self, messages: list[dict[str, Any]],
               options: RenderOptions = DEFAULT_RENDER) -> str:
        context = {**self._variables, **options.variables} if options.variables \
            else dict(self._variables)
        context["messages"] = messages
        context["add_generation_prompt"] = options.add_generation_prompt
        if options.tools is not None:
            context["tools"] = options.tools
        try:
            rendered = self._template.render(context)
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, ArithmeticError, AttributeError, LookupError, TypeError,
                ValueError, RecursionError) as exc:  # a request's variables: any JSON value
            raise ChatTemplateError(f"chat template failed: {exc}") from exc
        if options.continue_final_message:
            return continue_final(rendered, messages[-1]["content"] if messages else "")
        return rendered


def find_chat_template(model_dir: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The model's chat template source, or None when it has none."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    json_file = model_dir / "chat_template.json"  # older processor-style location
    if json_file.is_file():
        found = json.loads(json_file.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(found, str):
            return found
    template = tokenizer_config.get("chat_template")
    if isinstance(template, str):
        return template
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        chosen = named.get("default") or next(iter(named.values()), None)
        return chosen if isinstance(chosen, str) else None
    return None
