"""Chat images into vLLM prompts, and vLLM's KV events of image blocks back into Turnout's keys.

A request's images arrive at placeholder positions whose ids derive from each image's hash
(`common/image_keys.py`); the model's layout (`common/vision_layout.py`) says how many positions
an image takes. Two ways in:

- Every image carries its embedding (an encode worker ran the vision encoder): the prompt goes
  to vLLM as prompt embeddings (`EmbedsPrompt`): the language model's input embeddings of the
  tokens, the model's image token at the placeholders, with each image's embedding rows put in
  its place. What vLLM computes from that is what its own multimodal path computes.
- No image carries one (no encode pool): the prompt goes as tokens with one image token per
  image and the decoded images (`multi_modal_data`); vLLM's processor expands each image token
  to the model's count and runs the vision encoder in-line. The image's hash is its
  `multi_modal_uuids` entry. A mix (an encode worker lost mid-request) encodes the missing ones
  here with the model's vision encoder (`vision_encoder.py`) and goes the first way.

vLLM's block events carry the blocks' tokens as vLLM saw them (the image token, or nothing
meaningful for prompt embeddings) and per-block extra keys: `(image uuid, offset in block)` or
the SHA-256 of the block's prompt embeddings. `rekey` turns such a block's tokens back into the
request's own ids (placeholders included), so the block hashes the worker publishes are the
ones the router computes from the request.

Owns prompt building and the key memory; not vLLM's lifetime (`vllm_engine.py`) or re-hashing
(`vllm_kv_events.py`).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

from common.messages import GenerateRequest, ImageInput
from common.tensor_bytes import TensorBytesError, unpack
from common.vision_layout import VisionLayout
from services.worker.engine import EngineError
from services.worker.engines.vision_encoder import VisionModel, decode_image

# How many images' placeholder ids, and blocks' embedding digests, are remembered for rekeying.
MAX_IMAGES: Final = 4096
MAX_DIGESTS: Final = 65536
# The language model's input embedding table, under the names HF checkpoints use for LLaVA.
_EMBED_KEY: Final = re.compile(r"^(model\.)?language_model\.(model\.)?embed_tokens\.weight$")


def _bounded_put(table: OrderedDict[Any, Any], key: Any, value: Any, cap: int) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > cap:
        table.popitem(last=False)


def load_embedding_table(model_dir: str) -> Any:
    """Blocking: the language model's input embeddings (vocab, hidden) from the safetensors."""
    from safetensors import safe_open

    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if _EMBED_KEY.match(key):
                    return f.get_tensor(key)
    raise EngineError(f"{model_dir}: no language_model embed_tokens weight in its safetensors "
                      "(needed to splice image embeddings into a prompt)", 500)


class VllmImagePrompts:
    def __init__(self, model_dir: str, layout: VisionLayout, block_size: int,
                 dtype: Any = None) -> None:
        self.model_dir = model_dir
        self.layout = layout
        self.block_size = block_size
        # vLLM's model dtype (a torch dtype): vLLM casts prompt embeddings to it before it
        # hashes their blocks, so they are built in it. None: the checkpoint's.
        self.dtype = dtype
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vllm-images")
        self._table: Any = None  # the input embedding table, loaded on first use
        self._vision: VisionModel | None = None  # loaded only if a request needs it
        self._image_ids: OrderedDict[str, list[int]] = OrderedDict()  # uuid → placeholder ids
        self._digests: OrderedDict[bytes, list[int]] = OrderedDict()  # embeds block → ids

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def check(self, request: GenerateRequest) -> None:
        """Every image's placeholders inside the prompt, in order, of the model's count."""
        n = self.layout.tokens_per_image
        end = 0
        for i, image in enumerate(request.images):
            if image.num_tokens != n:
                raise EngineError(
                    f"image {i} takes {image.num_tokens} prompt positions; this model takes {n} "
                    "per image (start the frontend with --model of the same model directory)",
                    400)
            if image.offset < end or image.offset + n > len(request.token_ids):
                raise EngineError(f"image {i}'s positions [{image.offset}, {image.offset + n}) "
                                  "overlap another image or leave the prompt", 400)
            end = image.offset + n

    async def prompt(self, request: GenerateRequest) -> tuple[dict[str, Any], int]:
        """The vLLM prompt (a TokensPrompt or EmbedsPrompt dict) of a request with images, and
        how many of its images are encoded on this worker (no encode worker sent them)."""
        loop = asyncio.get_running_loop()
        inline = sum(1 for image in request.images if not image.embedding)
        if inline == len(request.images):
            prompt, uuids = await loop.run_in_executor(self._pool, self._pixels_prompt, request)
            for uuid, ids in uuids:  # the key memory is touched on the loop only
                _bounded_put(self._image_ids, uuid, ids, MAX_IMAGES)
        else:
            prompt, digests = await loop.run_in_executor(self._pool, self._embeds_prompt, request)
            for digest, ids in digests:
                _bounded_put(self._digests, digest, ids, MAX_DIGESTS)
        return prompt, inline

    def _uuids(self, request: GenerateRequest) -> list[str]:
        """One identifier per image, unique within the request (vLLM requires it)."""
        seen: dict[str, int] = {}
        out = []
        for image in request.images:
            k = seen[image.hash] = seen.get(image.hash, 0) + 1
            out.append(image.hash if k == 1 else f"{image.hash}#{k}")
        return out

    def _pixels_prompt(self, request: GenerateRequest,
                       ) -> tuple[dict[str, Any], list[tuple[str, list[int]]]]:
        """The tokens-and-images prompt, and each image's (uuid, placeholder ids)."""
        ids = request.token_ids
        token = self.layout.image_token_id
        prompt: list[int] = []
        at = 0
        pictures = []
        uuids = self._uuids(request)
        keys = []
        for image, uuid in zip(request.images, uuids, strict=True):
            prompt.extend(ids[at:image.offset])
            prompt.append(token)  # vLLM's processor expands it to the model's count
            at = image.offset + image.num_tokens
            pictures.append(decode_image(image.data))
            keys.append((uuid, ids[image.offset:at]))
        prompt.extend(ids[at:])
        prompt.extend(request.generated_token_ids)
        return {"prompt_token_ids": prompt, "multi_modal_data": {"image": pictures},
                "multi_modal_uuids": {"image": uuids}}, keys

    def _rows(self, image: ImageInput) -> Any:
        import torch

        if not image.embedding:  # its encode worker was lost: encode it here
            if self._vision is None:
                self._vision = VisionModel.load(self.model_dir)
            return self._vision.embed_pil(decode_image(image.data))
        try:
            packed = unpack(image.embedding)
        except TensorBytesError as exc:
            raise EngineError(f"image {image.hash[:12]}: bad embedding ({exc})", 400) from None
        want = (self.layout.tokens_per_image, self.layout.hidden_size)
        if packed.shape != want:
            raise EngineError(f"image {image.hash[:12]}: embedding of shape {packed.shape}; "
                              f"this model takes {want}", 400)
        return torch.frombuffer(bytearray(packed.data), dtype=getattr(torch, packed.dtype)
                                ).reshape(want)

    def _embeds_prompt(self, request: GenerateRequest,
                       ) -> tuple[dict[str, Any], list[tuple[bytes, list[int]]]]:
        """The prompt-embeddings prompt, and each full block's (rows digest, ids)."""
        import torch

        if self._table is None:
            table = load_embedding_table(self.model_dir)
            self._table = table if self.dtype is None else table.to(self.dtype)
        table = self._table
        ours = [*request.token_ids, *request.generated_token_ids]
        real = list(ours)
        for image in request.images:
            real[image.offset:image.offset + image.num_tokens] = \
                [self.layout.image_token_id] * image.num_tokens
        embeds = table[torch.tensor(real, dtype=torch.long)].clone()
        for image in request.images:
            rows = self._rows(image).to(embeds.dtype)
            embeds[image.offset:image.offset + image.num_tokens] = rows
        # vLLM keys a prompt-embeddings block by the SHA-256 of its rows: remember our ids.
        bs = self.block_size
        keys = []
        for start in range(0, len(ours) - bs + 1, bs):
            block = embeds[start:start + bs].flatten().contiguous().view(torch.uint8).numpy()
            keys.append((hashlib.sha256(block.data).digest(), ours[start:start + bs]))
        return {"prompt_embeds": embeds}, keys

    def rekey(self, tokens: list[int], extra_keys: Any) -> list[int]:
        """A stored block's tokens as the request had them, from its vLLM extra keys."""
        if not isinstance(extra_keys, (list, tuple)):
            return tokens
        out = tokens
        for key in extra_keys:
            if isinstance(key, bytes):
                found = self._digests.get(key)
                if found is not None and len(found) == len(tokens):
                    return list(found)
            elif isinstance(key, (list, tuple)) and len(key) == 2 and isinstance(key[0], str) \
                    and isinstance(key[1], int):
                ids = self._image_ids.get(key[0])
                if ids is None:
                    continue
                if out is tokens:
                    out = list(tokens)
                rel = key[1]
                for j in range(max(0, rel), min(len(out), rel + len(ids))):
                    out[j] = ids[j - rel]
        return out
