"""Where a multimodal model's images sit in its prompt: the image token's id and how many
positions one image takes, read from the model directory's config.json (no torch needed).

The frontend gives each image this many placeholder positions (`services/frontend/images.py`,
ids from `image_keys.py`); the LLM worker puts the model's image token there (or the image's
embedding rows) before the engine sees the prompt. Supported: LLaVA (`model_type` "llava":
one embedding per vision patch, the CLS token dropped by the "default" feature selection, kept
by "full"), whose processor resizes every image to the vision tower's input size, so the count
does not depend on the image's size.

Owns reading the layout; not the images (frontend) or the encoder (`vision_encoder`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llava",)


@dataclasses.dataclass(frozen=True, slots=True)
class VisionLayout:
    model_type: str
    image_token_id: int
    tokens_per_image: int
    hidden_size: int  # width of one embedding row (the language model's hidden size)

    def tokens_for(self, width: int, height: int) -> int:
        """Positions of a `width`x`height` image: the same for every size (it is resized)."""
        return self.tokens_per_image


def _int(cfg: dict[str, Any], key: str, where: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def vision_layout(model: str | Path) -> VisionLayout | None:
    """The layout of the model directory `model`, or None when it is not a vision-language
    model (no config.json, or no vision_config). ValueError for one this build cannot serve."""
    path = Path(model) / "config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(cfg, dict) or not isinstance(cfg.get("vision_config"), dict):
        return None
    where = str(path)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{where}: images for model_type {model_type!r} are not supported "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    vision = cfg["vision_config"]
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"{where}: vision_feature_select_strategy {strategy!r} is not "
                         "'default' or 'full'")
    if not isinstance(cfg.get("vision_feature_layer", -2), int):
        raise ValueError(f"{where}: only a single vision_feature_layer is supported")
    token_id = cfg.get("image_token_index", cfg.get("image_token_id"))
    if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
        raise ValueError(f"{where}: image_token_index must be a token id, got {token_id!r}")
    side = _int(vision, "image_size", where) // _int(vision, "patch_size", where)
    patches = side * side + (1 if strategy == "full" else 0)
    return VisionLayout(model_type, token_id, patches, _int(text, "hidden_size", where))
