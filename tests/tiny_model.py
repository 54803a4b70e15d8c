"""A tiny Llama-style model directory, built offline and deterministically, for tests.

Owns: a byte-level BPE tokenizer trained with `tokenizers` on text that ships with Python
(the Zen of Python and stdlib docstrings), its tokenizer_config.json with a Llama-3-style chat
template, config.json / generation_config.json with LlamaConfig fields, and (optionally) random
weights written with transformers + torch. Does not own any engine or serving logic.

Run `python tests/tiny_model.py [DIR]` to build one; tests call `cached_tiny_model()`.
"""

from __future__ import annotations

import codecs
import contextlib
import importlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
EOT = "<|eot_id|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
SPECIAL_TOKENS = [BOS, EOS, EOT, START_HEADER, END_HEADER]
# 2,048: NVIDIA Dynamo's mocker emits ids 1000-1999, so side-by-side benchmarks need them.
TARGET_VOCAB_SIZE = 2048
# Bumped whenever config.json changes, so a cached directory of an older shape is not reused.
# r2: head_dim 32 (vLLM's CPU attention backend supports no head size below 32).
ARCH_REVISION = 2

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('unsupported role: ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# Modules whose docstrings make the training text: common, stable, and pure stdlib.
_CORPUS_MODULES = (
    "builtins", "json", "collections", "functools", "itertools", "asyncio", "pathlib", "re",
    "string", "textwrap", "argparse", "logging", "dataclasses", "random", "statistics",
    "math", "os", "shutil", "subprocess", "socket", "threading", "queue", "heapq", "bisect",
    "csv", "datetime", "decimal", "fractions", "enum", "contextlib", "abc", "io", "struct",
)
# A little non-ASCII so multi-byte characters get merges of their own.
_EXTRA_TEXT = (
    "Café, naïve, résumé, Straße, Ærøskøbing. Привет, мир! こんにちは世界。你好\uff0c世界。"
    " 안녕하세요. 🙂 🚀 👍🏽 ✨ — \u201cquotes\u201d and \u2018apostrophes\u2019 … €100 ±5 °C\n"
)


def _zen_of_python() -> str:
    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen
        import this
    return codecs.decode(this.s, "rot13")


def _corpus() -> list[str]:
    texts = [_zen_of_python(), _EXTRA_TEXT * 8]
    for name in _CORPUS_MODULES:
        module = importlib.import_module(name)
        docs = [module.__doc__ or ""]
        for attr in sorted(dir(module)):
            doc = getattr(getattr(module, attr, None), "__doc__", None)
            if isinstance(doc, str):
                docs.append(doc)
        texts.append("\n".join(docs))
    return texts


def _train_tokenizer():  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB_SIZE - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    # Specials after the learned vocabulary, as in Llama 3.
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_weights(directory: Path, config: dict[str, object]) -> None:
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise RuntimeError(
            "build_tiny_model(with_weights=True) needs `torch` and `transformers` installed "
            f"({exc}); build without weights or install them"
        ) from exc
    torch.manual_seed(0)
    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    model = LlamaForCausalLM(LlamaConfig(**fields)).to(torch.float32)
    model.save_pretrained(str(directory), safe_serialization=True)
    # save_pretrained rewrites config.json / generation_config.json; keep ours authoritative.
    _write_json(directory / "config.json", config)


def build_tiny_model(directory: Path, with_weights: bool = False) -> Path:
    """Write a tiny Llama-style model into `directory` (created if missing) and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    ids = {tok: tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS}
    eos_ids = [ids[EOS], ids[EOT]]

    _write_json(directory / "tokenizer_config.json", {
        "added_tokens_decoder": {
            str(ids[tok]): {"content": tok, "lstrip": False, "normalized": False,
                            "rstrip": False, "single_word": False, "special": True}
            for tok in SPECIAL_TOKENS
        },
        "bos_token": BOS,
        "eos_token": EOT,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    config: dict[str, object] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "use_cache": True,
        "bos_token_id": ids[BOS],
        "eos_token_id": eos_ids,
        "torch_dtype": "float32",
    }
    _write_json(directory / "config.json", config)
    _write_json(directory / "generation_config.json", {
        "bos_token_id": ids[BOS],
        "eos_token_id": eos_ids,
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
    })
    if with_weights:
        _write_weights(directory, config)
    return directory


_REQUIRED_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json",
                   "generation_config.json")


def _has_weights(directory: Path) -> bool:
    return any(directory.glob("*.safetensors")) or any(directory.glob("*.bin"))


def cached_tiny_model(with_weights: bool = False) -> Path:
    """The tiny model under $TURNOUT_TEST_CACHE (default <repo>/.cache), built once."""
    default_root = Path(__file__).resolve().parents[1] / ".cache"
    root = Path(os.environ.get("TURNOUT_TEST_CACHE") or default_root)
    target = root / f"tiny-model-v{TARGET_VOCAB_SIZE}-r{ARCH_REVISION}"
    complete = all((target / name).is_file() for name in _REQUIRED_FILES)
    if complete and (not with_weights or _has_weights(target)):
        return target
    root.mkdir(parents=True, exist_ok=True)
    # Build aside and rename, so concurrent test processes never see a half-written model.
    scratch = Path(tempfile.mkdtemp(prefix="tiny-model-", dir=root))
    try:
        build_tiny_model(scratch, with_weights=with_weights)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            scratch.rename(target)
        except OSError:
            if not all((target / name).is_file() for name in _REQUIRED_FILES):
                raise  # someone else won the race only if they left a complete model
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else cached_tiny_model()
    if len(sys.argv) > 1:
        build_tiny_model(out, with_weights="--with-weights" in sys.argv[2:])
    print(out)
