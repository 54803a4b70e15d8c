"""Tokenizers: the built-in byte tokenizer, HF model directories, chat templates, loading."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from services.frontend.chat_template import (
    ChatTemplate,
    ChatTemplateError,
    RenderOptions,
    continue_final,
)
from services.frontend.protocol import chat_messages, parse_chat, render_options
from services.frontend.tokenizer import ByteTokenizer, HfTokenizer, load_tokenizer
from tests.tiny_model import BOS, EOS, EOT, cached_tiny_model

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the Zen of Python?"},
    {"role": "assistant", "content": "Beautiful is better than ugly."},
    {"role": "user", "content": "And then? 🙂"},
]


@pytest.fixture(scope="module")
def tiny() -> HfTokenizer:
    return HfTokenizer(cached_tiny_model())


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("héllo 🙂")
    assert ids[0] == ByteTokenizer.BOS
    assert ids[1:] == list("héllo 🙂".encode())
    assert tok.encode("hi", add_special_tokens=False) == [104, 105]
    assert tok.decode([*ids, ByteTokenizer.EOS]) == "héllo 🙂"
    assert tok.eos_token_ids == {257}
    assert tok.vocab_size == 258


def test_byte_tokenizer_chat_template() -> None:
    tok = ByteTokenizer()
    ids = tok.render_chat(CONVERSATION[:2])
    assert ids[0] == ByteTokenizer.BOS
    text = bytes(ids[1:]).decode()
    assert text == ("<|system|>\nBe brief.\n<|user|>\nWhat is the Zen of Python?\n"
                    "<|assistant|>\n")


def test_byte_tokenizer_renders_as_a_request_asks() -> None:
    tok = ByteTokenizer()

    def text(messages: list[dict[str, str]], options: RenderOptions) -> str:
        return bytes(tok.render_chat(messages, options)[1:]).decode()

    assert text(CONVERSATION[:2], RenderOptions(add_generation_prompt=False)).endswith(
        "<|user|>\nWhat is the Zen of Python?\n")
    prefill = [*CONVERSATION[:2], {"role": "assistant", "content": "Beautiful is"}]
    assert text(prefill, RenderOptions(False, continue_final_message=True)).endswith(
        "?\n<|assistant|>\nBeautiful is")
    with pytest.raises(ChatTemplateError, match="continue_final_message"):
        tok.render_chat([*CONVERSATION[:2], {"role": "assistant", "content": ""}],
                        RenderOptions(False, continue_final_message=True))


# A Qwen3-style switch: the template reads a variable a request may set.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content | trim }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    "{% endif %}")


def test_hf_template_renders_as_a_request_asks(tmp_path: Path) -> None:
    model = _copy_model(tmp_path)
    (model / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    tok = HfTokenizer(model)
    user = [{"role": "user", "content": "hi"}]

    def text(messages: list[dict[str, str]], options: RenderOptions) -> str:
        return tok._tokenizer.decode(tok.render_chat(messages, options),
                                     skip_special_tokens=False)

    assert text(user, RenderOptions()) == "<|user|>hi<|end|><|assistant|>"
    assert text(user, RenderOptions(variables={"enable_thinking": False})) == (
        "<|user|>hi<|end|><|assistant|><think></think>")
    assert text(user, RenderOptions(add_generation_prompt=False)) == "<|user|>hi<|end|>"
    # The template trims the final message: what it shows is continued, not its end of turn.
    prefill = [*user, {"role": "assistant", "content": " Sure, the answer is "}]
    assert text(prefill, RenderOptions(False, continue_final_message=True)) == (
        "<|user|>hi<|end|><|assistant|>Sure, the answer is")
    with pytest.raises(ChatTemplateError, match="continue_final_message"):
        tok.render_chat([*user, {"role": "assistant", "content": "  "}],
                        RenderOptions(False, continue_final_message=True))


def test_continue_final_keeps_what_the_template_kept() -> None:
    assert continue_final("<a>x y <end>", "x y ") == "<a>x y "
    assert continue_final("<a>x y<end>", " x y ") == "<a>x y"
    assert continue_final("<a>x<end><a>x<end>", "x") == "<a>x<end><a>x"  # the last one
    with pytest.raises(ChatTemplateError):
        continue_final("<a>[hidden]<end>", "x")  # the template does not show it


def test_a_requests_variables_cannot_break_the_template_open() -> None:
    template = ChatTemplate("{{ n + 1 }}|{{ bos_token }}", {"bos_token": "<s>"})
    assert template.render([], RenderOptions(variables={"n": 1})) == "2|<s>"
    assert template.render([], RenderOptions(variables={"n": 1, "bos_token": "B"})) == "2|B"
    for wrong in ("a", [1], {"k": 1}, None):
        with pytest.raises(ChatTemplateError, match="chat template failed"):
            template.render([], RenderOptions(variables={"n": wrong}))


def test_tiny_model_files_are_consistent(tiny: HfTokenizer) -> None:
    directory = cached_tiny_model()
    config = json.loads((directory / "config.json").read_text())
    assert config["vocab_size"] == tiny.vocab_size
    assert 1000 <= tiny.vocab_size <= 4096
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert set(config["eos_token_id"]) <= tiny.eos_token_ids


def test_hf_encode_adds_bos_only_when_asked(tiny: HfTokenizer) -> None:
    bos = tiny._tokenizer.token_to_id(BOS)
    with_bos = tiny.encode("Beautiful is better than ugly.")
    without = tiny.encode("Beautiful is better than ugly.", add_special_tokens=False)
    assert with_bos == [bos, *without]
    assert tiny.decode(with_bos) == "Beautiful is better than ugly."


def test_hf_eos_ids_come_from_configs(tiny: HfTokenizer) -> None:
    expected = {tiny._tokenizer.token_to_id(EOS), tiny._tokenizer.token_to_id(EOT)}
    assert tiny.eos_token_ids == expected


def test_hf_chat_template_renders_llama3_style(tiny: HfTokenizer) -> None:
    ids = tiny.render_chat(CONVERSATION)
    text = tiny._tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith(
        BOS + "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert "<|start_header_id|>user<|end_header_id|>\n\nAnd then? 🙂<|eot_id|>" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    # Specials are single tokens and BOS is not doubled.
    assert ids.count(tiny._tokenizer.token_to_id(BOS)) == 1
    assert ids[0] == tiny._tokenizer.token_to_id(BOS)


def test_hf_chat_template_can_refuse(tiny: HfTokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="unsupported role: tool"):
        tiny.render_chat([{"role": "tool", "content": "x"}])


def _copy_model(tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(cached_tiny_model(), target)
    return target


def test_chat_template_jinja_file_wins(tmp_path: Path) -> None:
    model = _copy_model(tmp_path)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}")
    tok = HfTokenizer(model)
    assert tok.decode(tok.render_chat([{"role": "user", "content": "hi"}])) == "[user]hi[assistant]"


def test_named_template_list_and_missing_template(tmp_path: Path) -> None:
    model = _copy_model(tmp_path)
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"},
                               {"name": "default", "template": "{{ messages[0].content }}!"}]
    config_path.write_text(json.dumps(config))
    tok = HfTokenizer(model)
    assert tok.decode(tok.render_chat([{"role": "user", "content": "hey"}])) == "hey!"

    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        HfTokenizer(model).render_chat([{"role": "user", "content": "hey"}])


def test_template_helpers_and_sandbox() -> None:
    template = ChatTemplate("{{ messages | tojson }}|{{ bos_token }}", {"bos_token": "<s>"})
    assert template.render([{"role": "user", "content": "é"}]) == (
        '[{"role": "user", "content": "é"}]|<s>')
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% for %}")


def test_load_tokenizer() -> None:
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer(""), ByteTokenizer)
    assert isinstance(load_tokenizer(str(cached_tiny_model())), HfTokenizer)
    with pytest.raises(ValueError, match="not a local model directory"):
        load_tokenizer("meta-llama/Llama-3.1-8B-Instruct-that-is-not-here")


def test_tiny_model_build_is_deterministic(tmp_path: Path) -> None:
    from tests.tiny_model import build_tiny_model

    a = build_tiny_model(tmp_path / "a")
    b = build_tiny_model(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json",
                 "generation_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_tiny_model_weights_need_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without torch (an import that fails, whatever is installed here) the weights build says
    what is missing instead of failing obscurely."""
    from tests.tiny_model import build_tiny_model

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(RuntimeError, match="needs `torch` and `transformers`"):
        build_tiny_model(tmp_path / "w", with_weights=True)


def test_tiny_model_weights_load_with_the_tokenizers_vocabulary(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.tiny_model import build_tiny_model

    directory = build_tiny_model(tmp_path / "w", with_weights=True)
    tok = HfTokenizer(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory))
    assert model.config.vocab_size == tok.vocab_size
    ids = tok.encode("Beautiful is better than ugly.")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert tuple(logits.shape) == (1, len(ids), tok.vocab_size)


# A template in the style of Qwen2.5's tool use: tools listed as JSON, earlier calls written
# back as <tool_call> blocks with their arguments as an object, results as <tool_response>.
QWEN_STYLE_TOOLS = (
    "{%- if tools %}<|im_start|>system\n<tools>{% for tool in tools %}\n{{ tool | tojson }}"
    "{% endfor %}\n</tools><|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "<tool_call>\n{\"name\": \"{{ tool_call.name }}\", \"arguments\": "
    "{{ tool_call.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}"
    "\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


def test_tools_and_earlier_calls_reach_the_template_as_templates_read_them() -> None:
    tool = {"type": "function", "function": {"name": "get_weather",
                                             "parameters": {"type": "object"}}}
    body = parse_chat(json.dumps({"model": "m", "tools": [tool], "messages": [
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}).encode())
    rendered = ChatTemplate(QWEN_STYLE_TOOLS).render(chat_messages(body), render_options(body))
    assert '<tools>{"type": "function", "function": {"name": "get_weather", "parameters": ' \
        '{"type": "object"}}}</tools>' in rendered
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' \
        in rendered.replace("\n", "")
    assert "<tool_response>sunny</tool_response>" in rendered.replace("\n", "")
    hidden = parse_chat(json.dumps({"model": "m", "tools": [tool], "tool_choice": "none",
                                    "messages": [{"role": "user", "content": "Paris?"}]}).encode())
    assert "<tools>" not in ChatTemplate(QWEN_STYLE_TOOLS).render(chat_messages(hidden),
                                                                   render_options(hidden))
