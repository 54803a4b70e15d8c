"""A multimodal model's vision encoder run with transformers: image file bytes in, the
embedding rows the language model takes at the image's positions out (`common/tensor_bytes`).

`VisionModel` loads only what images need from a HF model directory (LLaVA: the vision tower and
the projector; the language model is dropped after loading) with the directory's own image
processor, so an image becomes exactly what the model's processor makes of it. Its calls are
CPU/accelerator-bound and blocking: callers run them in an executor, never on the event loop.

`VisionEncodeEngine` is the engine of `turnout worker --worker-mode encode --engine vllm --model
DIR`: it starts no vLLM, only the vision encoder, on one executor thread (one image at a time,
as the encode worker's queue expects). The embedding cache and replies are `image_encoder.py`'s.

Owns loading the vision path and running it; not where embeddings go (the router, the LLM
worker's engine) or the prompt layout (`common/vision_layout`).
"""

from __future__ import annotations

import asyncio
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from common.messages import GenerateRequest, ImageInput, KvBlockStored
from common.tensor_bytes import pack
from common.vision_layout import VisionLayout, vision_layout
from services.worker.engine import Engine, EngineError, EngineLoad, StepSink

log = logging.getLogger("turnout.worker.vision")


class VisionModel:
    """The image path of a LLaVA model directory, loaded with transformers."""

    def __init__(self, model_dir: str, layout: VisionLayout, model: Any, processor: Any,
                 feature_layer: int, strategy: str) -> None:
        self.model_dir = model_dir
        self.layout = layout
        self._model = model
        self._processor = processor
        self._feature_layer = feature_layer
        self._strategy = strategy

    @classmethod
    def load(cls, model_dir: str) -> VisionModel:
        """Blocking: reads the weights."""
        layout = vision_layout(model_dir)
        if layout is None:
            raise ValueError(f"{model_dir} is not a vision-language model (its config.json has "
                             "no vision_config)")
        import torch
        from transformers import AutoImageProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype="auto")
        model.eval()
        # Only the vision tower and the projector run here: free the language model.
        model.model.language_model = None
        model.lm_head = None
        torch.set_grad_enabled(False)
        cfg = model.config
        return cls(model_dir, layout, model, AutoImageProcessor.from_pretrained(model_dir),
                   cfg.vision_feature_layer, cfg.vision_feature_select_strategy)

    def embed_pil(self, image: Any) -> Any:
        """The (tokens_per_image, hidden) embedding rows of a PIL image, as a torch tensor."""
        import torch

        pixels = self._processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = self._model.model.get_image_features(
                pixel_values=pixels.to(self._model.dtype),
                vision_feature_layer=self._feature_layer,
                vision_feature_select_strategy=self._strategy)
        # transformers 5 returns a model output holding the projected rows per image.
        features = getattr(out, "pooler_output", out)
        rows = features[0]
        if tuple(rows.shape) != (self.layout.tokens_per_image, self.layout.hidden_size):
            raise RuntimeError(f"the vision encoder made {tuple(rows.shape)} rows; the layout "
                               f"says ({self.layout.tokens_per_image}, "
                               f"{self.layout.hidden_size})")
        return rows.contiguous()

    def encode(self, data: bytes) -> bytes:
        """Blocking: an image file's embedding rows, packed (`common/tensor_bytes`)."""
        rows = self.embed_pil(decode_image(data))
        dtype = str(rows.dtype).removeprefix("torch.")
        import torch

        raw = rows.view(torch.uint8).numpy().tobytes() if dtype == "bfloat16" \
            else rows.numpy().tobytes()
        return pack(tuple(rows.shape), dtype, raw)


def decode_image(data: bytes) -> Any:
    """A PIL image of the file bytes (the frontend checked them already); EngineError if not."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise EngineError(f"the image cannot be decoded ({exc})", 400) from None
    return image


class VisionEncodeEngine(Engine):
    """An encode worker's engine for a real model: the vision encoder only."""

    def __init__(self, model: str, block_size: int = 64) -> None:
        if not model:
            raise ValueError("--worker-mode encode with a real engine needs --model (a HF model "
                             "directory)")
        layout = vision_layout(model)  # fails early on a model it cannot encode for
        if layout is None:
            raise ValueError(f"--worker-mode encode: {model} is not a vision-language model "
                             "(its config.json has no vision_config)")
        self.model = model
        self.layout = layout
        self.block_size = block_size
        self.max_model_len = 0  # generates nothing
        self._vision: VisionModel | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vision-encoder")

    async def start(self, sink: StepSink) -> None:
        loop = asyncio.get_running_loop()
        self._vision = await loop.run_in_executor(self._pool, VisionModel.load, self.model)
        log.info("vision encoder ready", extra={"fields": {
            "model": self.model, "tokens_per_image": self.layout.tokens_per_image}})

    async def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._vision = None

    async def encode_image(self, image: ImageInput) -> bytes:
        vision = self._vision
        if vision is None:
            raise EngineError("the vision encoder is not started", 503)
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, vision.encode, image.data)

    def add_request(self, request: GenerateRequest) -> None:
        raise EngineError("an encode worker does not generate", 400)

    def abort(self, request_id: str) -> None:
        return None

    def load(self) -> EngineLoad:
        return EngineLoad()

    def steps_done(self) -> int:
        return 0

    def kv_dump(self) -> list[KvBlockStored]:
        return []
