"""vitcache's results as SGLang precomputed embeddings, through sglang 0.5.23's own multimodal processors."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sglang.srt.managers.io_struct import GenerateReqInput
from sglang.srt.managers.schedule_batch import MultimodalInputFormat
from sglang.srt.multimodal.processors.kimi_common import KimiGridMMDataMixin, _item_grid_thw
from sglang.srt.multimodal.processors.kimi_k25 import (
    KimiK2_5VLImageProcessor,
    _grid_thw_from_resize_config,
    navit_resize_config,
)
from sglang.srt.multimodal.processors.qwen_vl import QwenVLImageProcessor
from sglang.srt.runtime_context import publish
from sglang.srt.server_args import ServerArgs
from transformers import AutoConfig, AutoImageProcessor
from transformers.video_utils import VideoMetadata
from vitcache.client import Video, VitCacheClient
from vitcache.integrations.sglang import (
    expand_image_tokens,
    expand_video_tokens,
    image_embedding,
    precomputed_embedding,
)

from .conftest import KIMI_SPECIAL_TOKENS, QWEN_FAMILIES, png, tiny_tokenizer

PROMPT = "describe <|vision_start|><|image_pad|><|vision_end|> and <|vision_start|><|image_pad|><|vision_end|> ."
IMAGES = (png(90, 60, seed=1), png(50, 120, seed=2))  # two sizes: two grids, two spans of tokens
VIDEO_PROMPT = "describe <|vision_start|><|video_pad|><|vision_end|> and <|vision_start|><|video_pad|><|vision_end|> ."
# SGLang hands frames (not a file) to transformers' processor without their rate, which takes them as 24 fps.
FPS = 24.0


def clip(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


# Two clips, of 4 and 5 frames (two and three temporal groups, the last padded), of two sizes.
CLIPS = (clip(4, 60, 90, seed=3), clip(5, 84, 56, seed=4))


def sglang_qwen_processor(family: str, checkpoint: Path) -> QwenVLImageProcessor:
    """SGLang's processor for a Qwen checkpoint, over the HF processor SGLang would load for it."""
    import transformers

    processor_cls, video_cls = {
        "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
        "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
        "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
    }[family]
    hf_processor = getattr(transformers, processor_cls)(
        image_processor=AutoImageProcessor.from_pretrained(checkpoint),
        tokenizer=tiny_tokenizer(),
        video_processor=getattr(transformers, video_cls).from_pretrained(checkpoint),
    )
    server_args = ServerArgs(model_path=str(checkpoint), device="cpu")
    publish(server_args, role="test")
    return QwenVLImageProcessor(AutoConfig.from_pretrained(checkpoint), server_args, hf_processor, "default")


def process(processor: QwenVLImageProcessor, prompt: str, image_data: list, video_data: list | None = None):  # type: ignore[no-untyped-def]
    request = GenerateReqInput(text=prompt, image_data=image_data, video_data=video_data)
    return asyncio.run(processor.process_mm_data_async(image_data, prompt, request))


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_qwen_precomputed_matches_sglang_processing_the_images(family, checkpoints, vitcache_targets):
    processor = sglang_qwen_processor(family, checkpoints[family])
    with VitCacheClient(vitcache_targets[family]) as client:
        results = [result.raise_for_error() for result in client.encode(list(IMAGES))]

    from_images = process(processor, PROMPT, [Image.open(io.BytesIO(data)).convert("RGB") for data in IMAGES])
    item = precomputed_embedding(results, family)
    from_vitcache = process(processor, expand_image_tokens(PROMPT, results, family), [item])

    assert_as_sglang_processed(from_vitcache, from_images, item, results, "image_grid_thw")


def assert_as_sglang_processed(from_vitcache, from_media, item: dict, results: list, grid_key: str) -> None:  # type: ignore[no-untyped-def]
    """The same tokens and M-RoPE positions as when SGLang preprocesses the media itself; the same spans and grids,
    the embeddings in place of the pixels (one bundled precomputed item)."""
    assert from_vitcache.input_ids == from_media.input_ids
    assert torch.equal(from_vitcache.mrope_positions, from_media.mrope_positions)
    assert torch.equal(*(torch.as_tensor(out.mrope_position_delta) for out in (from_vitcache, from_media)))
    (precomputed,) = from_vitcache.mm_items
    assert precomputed.format == MultimodalInputFormat.PRECOMPUTED_EMBEDDING
    assert precomputed.offsets == [span for media in from_media.mm_items for span in media.offsets]
    grids = torch.cat([torch.as_tensor(getattr(media, grid_key)).reshape(-1, 3) for media in from_media.mm_items])
    assert torch.equal(torch.as_tensor(precomputed.model_specific_data[grid_key]), grids)
    assert precomputed.hash == item["hash"]
    assert torch.equal(precomputed.feature, torch.cat([image_embedding(r) for r in results]))
    assert sum(end - start + 1 for start, end in precomputed.offsets) == precomputed.feature.shape[0]


def sglang_video_input(processor: QwenVLImageProcessor, family: str) -> list:
    """CLIPS as SGLang takes videos it processes itself: frames, handed to transformers' processor. Qwen3-VL needs
    the frames' timing, which SGLang 0.5.23 gives only for a file it decodes (torchcodec or decord, not installed
    here; for frames it passes ``video_metadata=[None, ...]``, which transformers refuses): for it, transformers'
    processor output with the frames' timing, which SGLang takes as a ``processor_output`` video item."""
    frames = [torch.from_numpy(clip) for clip in CLIPS]
    if family != "qwen3_vl":
        return frames
    metadata = [
        VideoMetadata(total_num_frames=len(clip), fps=FPS, frames_indices=list(range(len(clip)))) for clip in CLIPS
    ]
    output = processor._processor(
        text=[VIDEO_PROMPT], videos=frames, video_metadata=metadata, do_sample_frames=False, return_tensors="pt"
    )
    return [{"format": "processor_output", **output}]


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_qwen_precomputed_videos_match_sglang_processing_the_frames(family, checkpoints, vitcache_targets):
    processor = sglang_qwen_processor(family, checkpoints[family])
    with VitCacheClient(vitcache_targets[family]) as client:
        videos = [Video(frames, timestamps=[n / FPS for n in range(len(frames))]) for frames in CLIPS]
        results = [result.raise_for_error() for result in client.encode(videos)]

    from_frames = process(processor, VIDEO_PROMPT, [], sglang_video_input(processor, family))
    item = precomputed_embedding(results, family)
    from_vitcache = process(processor, expand_video_tokens(VIDEO_PROMPT, results, family), [], [item])

    # Qwen3-VL's timestamps text and Qwen2.5-VL's M-RoPE time steps (second_per_grid_ts) included.
    assert_as_sglang_processed(from_vitcache, from_frames, item, results, "video_grid_thw")


def test_qwen3_vl_deepstack_columns_split_as_sglang_splits_them(checkpoints, vitcache_targets):
    from sglang.srt.models.qwen3_vl import Qwen3VLForConditionalGeneration

    config = AutoConfig.from_pretrained(checkpoints["qwen3_vl"])
    with VitCacheClient(vitcache_targets["qwen3_vl"]) as client:
        (result,) = client.encode([IMAGES[0]])
    assert len(result.raise_for_error().embeddings) == 1 + len(config.vision_config.deepstack_visual_indexes)
    feature = precomputed_embedding([result], "qwen3_vl")["feature"]
    # SGLang's own split, with the two attributes it reads from its model.
    model = SimpleNamespace(config=config.text_config, num_deepstack_embeddings=len(result.embeddings) - 1)
    merged, deepstack = Qwen3VLForConditionalGeneration.separate_deepstack_embeds(model, feature)
    assert torch.equal(merged, result.embeddings[0])
    assert torch.equal(deepstack, torch.cat(result.embeddings[1:], dim=-1))


class KimiRemoteProcessorCalls:
    """The calls SGLang's Kimi-K2.5 processor makes on the checkpoint's remote-code HF processor (``media_processor``
    with ``media_proc_cfg`` and ``media_tokens_calculator``; ``__call__(text, medias=...)``), answered by transformers'
    own Kimi-K2.5 image processor of the tiny checkpoint: the tiny checkpoint is transformers-native and Moonshot's
    remote code is not fetched in tests. Token counts and grids are transformers' arithmetic, not made up."""

    def __init__(self, checkpoint: Path) -> None:
        self.image_processor = AutoImageProcessor.from_pretrained(checkpoint)
        self.tokenizer = tiny_tokenizer(KIMI_SPECIAL_TOKENS)
        self.media_processor = self
        processor = self.image_processor
        self.media_proc_cfg = {
            "patch_size": processor.patch_size,
            "merge_kernel_size": processor.merge_size,
            "in_patch_limit": processor.max_patches,
            "patch_limit_on_one_side": processor.size["max_height"],
            "image_mean": list(processor.image_mean),
            "image_std": list(processor.image_std),
        }

    def media_tokens_calculator(self, media: dict) -> int:
        width, height = media["image"].size
        return self.image_processor.get_number_of_image_patches(height, width, {}) // self.image_processor.merge_size**2

    def __call__(self, text: list[str], medias: list[dict], **kwargs: object) -> dict:
        pixels = self.image_processor([media["image"] for media in medias], return_tensors="pt")
        input_ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        return {"input_ids": input_ids, "pixel_values": pixels["pixel_values"], "grid_thws": pixels["image_grid_thw"]}


def sglang_kimi_processor(checkpoint: Path) -> KimiK2_5VLImageProcessor:
    """SGLang's Kimi-K2.5 processor; the remote-code config names the image token media_placeholder_token_id."""
    config = AutoConfig.from_pretrained(checkpoint)
    config.media_placeholder_token_id = config.image_token_id
    server_args = ServerArgs(model_path=str(checkpoint), device="cpu")
    publish(server_args, role="test")
    return KimiK2_5VLImageProcessor(config, server_args, KimiRemoteProcessorCalls(checkpoint), "default")


@pytest.mark.parametrize("image", IMAGES, ids=("90x60", "50x120"))
def test_kimi_k25_precomputed_matches_sglang_processing_the_image(image, checkpoints, vitcache_targets):
    processor = sglang_kimi_processor(checkpoints["kimi_k25"])
    with VitCacheClient(vitcache_targets["kimi_k25"]) as client:
        (result,) = [r.raise_for_error() for r in client.encode([image])]
    prompt = "describe <|media_pad|> ."

    from_image = process(processor, prompt, [Image.open(io.BytesIO(image)).convert("RGB")])
    item = precomputed_embedding([result], "kimi_k25")
    from_vitcache = process(processor, expand_image_tokens(prompt, [result], "kimi_k25"), [item])

    # The same tokens, span and grid as when SGLang preprocesses the image itself; the embedding in place of pixels.
    assert from_vitcache.input_ids == from_image.input_ids
    (pixels,), (precomputed,) = from_image.mm_items, from_vitcache.mm_items
    assert precomputed.format == MultimodalInputFormat.PRECOMPUTED_EMBEDDING
    assert precomputed.offsets == pixels.offsets
    assert _item_grid_thw(precomputed) == _item_grid_thw(pixels)
    assert torch.equal(precomputed.feature, image_embedding(result))
    ((start, end),) = precomputed.offsets
    assert end - start + 1 == precomputed.feature.shape[0]
    assert precomputed.hash is not None  # SGLang's own identity, from the embedding (callers may not give one)
    # SGLang's GPU path sizes images with its own arithmetic: the same count.
    width, height = Image.open(io.BytesIO(image)).size
    config = processor._processor.media_processor.media_proc_cfg
    resize = navit_resize_config(
        width,
        height,
        config["patch_size"],
        config["merge_kernel_size"],
        config["in_patch_limit"],
        config["patch_limit_on_one_side"],
    )
    assert resize["num_tokens"] == precomputed.feature.shape[0]
    assert tuple(_item_grid_thw(precomputed)) == _grid_thw_from_resize_config(resize, config["patch_size"])


def test_kimi_k25_takes_one_image_and_no_caller_identity(vitcache_targets):
    with VitCacheClient(vitcache_targets["kimi_k25"]) as client:
        results = [result.raise_for_error() for result in client.encode(list(IMAGES))]
    with pytest.raises(ValueError, match=r"one precomputed Kimi-K2\.5 image"):
        precomputed_embedding(results, "kimi_k25")
    with pytest.raises(ValueError, match="hash"):  # why the Qwen items' hash is left out for Kimi
        KimiGridMMDataMixin.reject_caller_image_identity([precomputed_embedding(results[:1], "qwen2_vl")], None)


def test_expand_image_tokens_counts_placeholders(vitcache_targets):
    with VitCacheClient(vitcache_targets["qwen2_vl"]) as client:
        results = client.encode(list(IMAGES))
    with pytest.raises(ValueError, match=re.escape("2 <|image_pad|> placeholders for 1 images")):
        expand_image_tokens(PROMPT, results[:1], "qwen2_vl")
    with pytest.raises(ValueError, match="unsupported model_type"):
        precomputed_embedding(results, "llava")


def test_images_and_videos_are_separate_items(vitcache_targets):
    with VitCacheClient(vitcache_targets["qwen2_vl"]) as client:
        results = client.encode([IMAGES[0], Video(CLIPS[0], timestamps=[n / FPS for n in range(len(CLIPS[0]))])])
    with pytest.raises(ValueError, match="1 of 2 results are videos"):
        precomputed_embedding(results, "qwen2_vl")
    with pytest.raises(ValueError, match="takes videos"):
        expand_video_tokens(VIDEO_PROMPT, results[:1], "qwen2_vl")
    with pytest.raises(ValueError, match=re.escape("2 <|video_pad|> placeholders for 1 videos")):
        expand_video_tokens(VIDEO_PROMPT, results[1:], "qwen2_vl")


def test_module_imports_only_the_client_side():
    import subprocess
    import sys

    code = (
        "import sys, vitcache.integrations.sglang; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'sglang')"
        " or m.startswith('vitcache.server')))"
    )
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]"
