"""Images on a real model without starting vLLM: the packed-tensor format, the model's image
layout, the transformers vision encoder against HF's own LLaVA, the prompt a vLLM worker builds
against HF's LlavaProcessor, and the rekeying of vLLM's image-block events."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import random
import struct
from pathlib import Path

import pytest

from common.image_keys import placeholder_ids
from common.messages import GenerateRequest, ImageInput, SamplingParams
from common.tensor_bytes import TensorBytesError, pack, unpack
from common.vision_layout import vision_layout
from tests.tiny_model import cached_tiny_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from services.frontend import protocol  # noqa: E402
from services.frontend.images import ChatImages, ImageLimits  # noqa: E402
from services.frontend.tokenizer import HfTokenizer  # noqa: E402
from services.worker.engines.vision_encoder import VisionModel  # noqa: E402
from services.worker.engines.vllm_images import VllmImagePrompts  # noqa: E402
from tests.tiny_llava import IMAGE_TOKEN, IMAGE_TOKENS, cached_tiny_llava  # noqa: E402


def noise_png(seed: int, size: tuple[int, int] = (70, 40)) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", size)
    img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256))
                 for _ in range(size[0] * size[1])])
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def llava() -> Path:
    return cached_tiny_llava()


@pytest.fixture(scope="module")
def hf(llava: Path) -> tuple[object, object]:
    model = transformers.LlavaForConditionalGeneration.from_pretrained(str(llava),
                                                                       dtype=torch.float32)
    return model.eval(), transformers.AutoProcessor.from_pretrained(str(llava))


# -- the packed tensor ----------------------------------------------------------------------------

def test_packed_tensor_round_trip() -> None:
    rows = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    payload = pack((3, 4), "float32", rows.numpy().tobytes())
    back = unpack(payload)
    assert back.shape == (3, 4) and back.dtype == "float32"
    assert torch.equal(torch.frombuffer(bytearray(back.data), dtype=torch.float32).reshape(3, 4),
                       rows)


@pytest.mark.parametrize("payload, why", [
    (b"\x00" * 64, "no TNSR header"),
    (b"TNSR" + struct.pack("<BB", 9, 7) + b"float32" + struct.pack("<BI", 1, 1) + b"\0" * 4,
     "version 9"),
    (b"TNSR" + struct.pack("<BB", 1, 5) + b"int64" + struct.pack("<BI", 1, 1) + b"\0" * 8,
     "dtype 'int64'"),
    (pack((2, 2), "float32", b"\0" * 16)[:-4], "carries 12 bytes of elements, not 16"),
])
def test_bad_packed_tensors_are_refused(payload: bytes, why: str) -> None:
    with pytest.raises(TensorBytesError, match=why):
        unpack(payload)


def test_pack_refuses_a_size_mismatch() -> None:
    with pytest.raises(TensorBytesError, match="not a float32 tensor of shape"):
        pack((2, 2), "float32", b"\0" * 15)


# -- the model's layout ---------------------------------------------------------------------------

def test_layout_of_the_tiny_llava(llava: Path) -> None:
    layout = vision_layout(llava)
    assert layout is not None
    tokenizer = json.loads((llava / "tokenizer.json").read_text())
    image_id = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == IMAGE_TOKEN)
    assert layout.image_token_id == image_id
    assert layout.tokens_per_image == IMAGE_TOKENS == 16
    assert layout.tokens_for(1000, 10) == layout.tokens_for(10, 10) == 16
    assert layout.hidden_size == 64


def test_layout_of_text_models_and_unsupported_ones(tmp_path: Path) -> None:
    assert vision_layout(cached_tiny_model()) is None
    assert vision_layout(tmp_path) is None  # no config.json
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "qwen2_vl", "vision_config": {}}))
    with pytest.raises(ValueError, match="model_type 'qwen2_vl' are not supported"):
        vision_layout(tmp_path)


# -- the vision encoder and the prompt, against HF's LLaVA ----------------------------------------

def test_vision_encoder_matches_hf_llava(llava: Path, hf: tuple[object, object]) -> None:
    model, processor = hf
    data = noise_png(1)
    packed = unpack(VisionModel.load(str(llava)).encode(data))
    assert packed.shape == (16, 64) and packed.dtype == "float32"
    ours = torch.frombuffer(bytearray(packed.data), dtype=torch.float32).reshape(16, 64)
    pixels = processor.image_processor(Image.open(io.BytesIO(data)).convert("RGB"),
                                       return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        theirs = model.model.get_image_features(  # type: ignore[attr-defined]
            pixel_values=pixels, vision_feature_layer=-2,
            vision_feature_select_strategy="default").pooler_output[0]
    assert torch.allclose(ours, theirs, atol=1e-5)


def frontend_prompt(llava: Path, png: bytes) -> tuple[list[int], list[ImageInput]]:
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    body = protocol.parse_chat(json.dumps({
        "model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Look:"},
            {"type": "image_url", "image_url": {"url": uri}},
            {"type": "text", "text": "what is it?"}]}]}).encode())
    images = ChatImages(ImageLimits(), layout=vision_layout(llava))

    async def run() -> tuple[list[int], list[ImageInput]]:
        try:
            return await images.prompt(body, HfTokenizer(llava))
        finally:
            await images.fetcher.close()

    return asyncio.run(run())


def test_prompt_is_what_the_models_processor_makes(llava: Path, hf: tuple[object, object],
                                                   ) -> None:
    model, processor = hf
    png = noise_png(2)
    ids, images = frontend_prompt(llava, png)
    assert len(images) == 1 and images[0].num_tokens == 16
    image = images[0]
    # The frontend's placeholders carry the image's hash (the KV block keys).
    assert ids[image.offset:image.offset + 16] == placeholder_ids(image.hash, 16, 2049)

    request = GenerateRequest("r", "m", ids, SamplingParams(max_tokens=8), images=images)
    prompts = VllmImagePrompts(str(llava), vision_layout(llava), 32)  # type: ignore[arg-type]
    try:
        prompts.check(request)
        pixels_prompt, inline = asyncio.run(prompts.prompt(request))
        assert inline == 1
        # One image token where the image goes: vLLM's processor expands it.
        collapsed = pixels_prompt["prompt_token_ids"]
        assert len(collapsed) == len(ids) - 15
        assert pixels_prompt["multi_modal_uuids"] == {"image": [image.hash]}

        text = processor.apply_chat_template(  # type: ignore[attr-defined]
            [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"},
                                          {"type": "text", "text": "what is it?"}]}],
            add_generation_prompt=True)
        theirs = processor(text=text, images=Image.open(io.BytesIO(png)),  # type: ignore[operator]
                           add_special_tokens=False, return_tensors="pt")
        expected = theirs["input_ids"][0].tolist()
        real = list(ids)
        real[image.offset:image.offset + 16] = [2048] * 16
        assert real == expected

        embedded = request
        embedded.images = [ImageInput(image.hash, image.offset, 16,
                                      embedding=VisionModel.load(str(llava)).encode(png))]
        embeds_prompt, inline = asyncio.run(prompts.prompt(embedded))
        assert inline == 0
        with torch.no_grad():
            hf_embeds = model.get_input_embeddings()(theirs["input_ids"])[0]  # type: ignore[attr-defined]
            feats = model.model.get_image_features(  # type: ignore[attr-defined]
                pixel_values=theirs["pixel_values"], vision_feature_layer=-2,
                vision_feature_select_strategy="default").pooler_output[0]
            hf_embeds[image.offset:image.offset + 16] = feats
        assert torch.allclose(embeds_prompt["prompt_embeds"], hf_embeds, atol=1e-5)
    finally:
        prompts.close()


# -- vLLM's events of image blocks, rekeyed -------------------------------------------------------

def test_rekey_restores_the_requests_placeholders(llava: Path) -> None:
    prompts = VllmImagePrompts(str(llava), vision_layout(llava), 8)  # type: ignore[arg-type]
    try:
        h = "ab" * 32
        holders = placeholder_ids(h, 16, 2049)
        ids = [1, 2, 3, *holders, 4, 5, 6, 7, 8]  # the image at 3..18
        request = GenerateRequest("r", "m", ids, SamplingParams(max_tokens=8),
                                  images=[ImageInput(h, 3, 16, "image/png", noise_png(3))])
        asyncio.run(prompts.prompt(request))  # remembers the image's ids under its uuid
        seen = [1, 2, 3, *[2048] * 16, 4, 5, 6, 7, 8]  # what vLLM's blocks hold
        blocks = [seen[i:i + 8] for i in range(0, 24, 8)]
        # vLLM's extra keys: (uuid, image offset relative to the block's start).
        assert prompts.rekey(blocks[0], [[h, 3]]) == ids[0:8]
        assert prompts.rekey(blocks[1], [[h, -5]]) == ids[8:16]
        assert prompts.rekey(blocks[2], [[h, -13]]) == ids[16:24]
        assert prompts.rekey(blocks[2], None) == blocks[2]
        assert prompts.rekey(blocks[2], [["unknown", 0]]) == blocks[2]

        # Prompt embeddings: vLLM keys a block by the SHA-256 of its rows.
        request.images = [ImageInput(h, 3, 16, embedding=pack(
            (16, 64), "float32", torch.ones(16, 64).numpy().tobytes()))]
        embeds = asyncio.run(prompts.prompt(request))[0]["prompt_embeds"]
        digest = hashlib.sha256(
            embeds[8:16].flatten().contiguous().view(torch.uint8).numpy().data).digest()
        assert prompts.rekey([0] * 8, [digest]) == ids[8:16]
    finally:
        prompts.close()


# -- the encode worker's engine -------------------------------------------------------------------

def test_encode_worker_of_a_text_model_fails_at_startup_in_one_line() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "turnout", "worker", "--worker-mode", "encode", "--engine", "vllm",
         "--model", str(cached_tiny_model())],
        cwd=Path(__file__).resolve().parents[2], text=True, capture_output=True, timeout=120)
    assert done.returncode != 0
    assert "is not a vision-language model" in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr  # one line, no traceback


def test_encode_engine_embeds_off_the_loop(llava: Path) -> None:
    from services.worker.engine import EngineError
    from services.worker.engines.vision_encoder import VisionEncodeEngine

    async def run() -> None:
        engine = VisionEncodeEngine(str(llava))
        await engine.start(lambda out: None)
        try:
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0)

            ticker = asyncio.create_task(tick())
            packed = unpack(await engine.encode_image(ImageInput("ab" * 32, 0, 16, "image/png",
                                                                 noise_png(5))))
            ticker.cancel()
            assert packed.shape == (16, 64)
            assert ticks > 1  # the loop ran while the vision tower did
            with pytest.raises(EngineError, match="cannot be decoded"):
                await engine.encode_image(ImageInput("cd" * 32, 0, 16, "image/png", b"nope"))
            with pytest.raises(EngineError, match="does not generate"):
                engine.add_request(GenerateRequest("r", "m", [1], SamplingParams(max_tokens=1)))
        finally:
            await engine.shutdown()

    asyncio.run(run())
