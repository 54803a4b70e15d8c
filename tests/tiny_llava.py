"""A tiny LLaVA model directory (`LlavaForConditionalGeneration`), built offline and
deterministically, for multimodal tests on a real engine.

Owns: the tiny Llama's tokenizer (`tiny_model`) with an `<image>` special token added, a chat
template that places `<image>` where a message's image parts are, parts joined by newlines as
Turnout's frontend joins them (string content passes through, so the frontend can put its own
marker there), config.json with a 2-layer CLIP vision tower
(56x56 pixels, 14-pixel patches: 16 image tokens) and the tiny Llama as text model,
preprocessor_config.json / processor_config.json for HF's `LlavaProcessor`
(`CLIPImageProcessor`), and random float32 weights written with transformers + torch.

Run `python tests/tiny_llava.py [DIR]` to build one; tests call `cached_tiny_llava()`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tests.tiny_model import BOS, EOS, EOT, SPECIAL_TOKENS, _train_tokenizer

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 56
PATCH_SIZE = 14
# "default" feature selection drops the CLS token: one embedding per patch.
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
# Bumped whenever a file's content changes, so a cached directory of an older shape is not reused.
REVISION = 2

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('unsupported role: ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] | trim }}"
    "{%- else %}"
    "{%- for part in message['content'] %}"
    "{%- if not loop.first %}{{- '\\n' }}{%- endif %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}"
    "{%- else %}{{- '<image>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
# CLIP's normalisation constants (what every LLaVA checkpoint's preprocessor uses).
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_llava(directory: Path) -> Path:
    """Write the tiny LLaVA (weights included) into `directory` and return it."""
    try:
        import torch
        from transformers import LlavaConfig, LlavaForConditionalGeneration
    except ImportError as exc:
        raise RuntimeError(f"build_tiny_llava needs `torch` and `transformers` ({exc})") from exc
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    tokenizer.add_special_tokens([IMAGE_TOKEN])
    tokenizer.save(str(directory / "tokenizer.json"))
    specials = [*SPECIAL_TOKENS, IMAGE_TOKEN]
    ids = {tok: tokenizer.token_to_id(tok) for tok in specials}
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    eos_ids = [ids[EOS], ids[EOT]]
    _write_json(directory / "tokenizer_config.json", {
        "added_tokens_decoder": {
            str(ids[tok]): {"content": tok, "lstrip": False, "normalized": False,
                            "rstrip": False, "single_word": False, "special": True}
            for tok in specials
        },
        "bos_token": BOS,
        "eos_token": EOT,
        "image_token": IMAGE_TOKEN,
        "extra_special_tokens": {"image_token": IMAGE_TOKEN},
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "processor_class": "LlavaProcessor",
    })
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    text_config: dict[str, object] = {
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
        "bos_token_id": ids[BOS],
        "eos_token_id": eos_ids,
        "torch_dtype": "float32",
    }
    vision_config: dict[str, object] = {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "num_channels": 3,
        "projection_dim": 32,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "torch_dtype": "float32",
    }
    config: dict[str, object] = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": text_config,
        "vision_config": vision_config,
        "image_token_index": ids[IMAGE_TOKEN],
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_seq_length": IMAGE_TOKENS,
        "multimodal_projector_bias": True,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    torch.manual_seed(0)
    hf_config = LlavaConfig(**{k: v for k, v in config.items() if k not in (
        "architectures", "model_type")})
    model = LlavaForConditionalGeneration(hf_config).to(torch.float32)
    # Random init of this size gives near-flat logits; a wider spread makes greedy picks
    # robust to the last-ulp differences between two correct implementations.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2 if "lm_head" in name else 0.05)
    model.save_pretrained(str(directory), safe_serialization=True)
    _write_json(directory / "config.json", config)  # ours stays authoritative
    _write_json(directory / "generation_config.json", {
        "bos_token_id": ids[BOS], "eos_token_id": eos_ids})
    _write_json(directory / "preprocessor_config.json", {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "LlavaProcessor",
        "do_resize": True,
        "size": {"shortest_edge": IMAGE_SIZE},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": _CLIP_MEAN,
        "image_std": _CLIP_STD,
        "do_convert_rgb": True,
    })
    _write_json(directory / "processor_config.json", {
        "processor_class": "LlavaProcessor",
        "image_token": IMAGE_TOKEN,
        "patch_size": PATCH_SIZE,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
    })
    return directory


_REQUIRED_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json",
                   "preprocessor_config.json", "processor_config.json", "model.safetensors")


def cached_tiny_llava() -> Path:
    """The tiny LLaVA under $TURNOUT_TEST_CACHE (default <repo>/.cache), built once."""
    default_root = Path(__file__).resolve().parents[1] / ".cache"
    root = Path(os.environ.get("TURNOUT_TEST_CACHE") or default_root)
    target = root / f"tiny-llava-r{REVISION}"
    if all((target / name).is_file() for name in _REQUIRED_FILES):
        return target
    root.mkdir(parents=True, exist_ok=True)
    # Build aside and rename, so concurrent test processes never see a half-written model.
    scratch = Path(tempfile.mkdtemp(prefix="tiny-llava-", dir=root))
    try:
        build_tiny_llava(scratch)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            scratch.rename(target)
        except OSError:
            if not all((target / name).is_file() for name in _REQUIRED_FILES):
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(build_tiny_llava(Path(sys.argv[1])) if len(sys.argv) > 1 else cached_tiny_llava())
