"""vitcache's results as SGLang precomputed embeddings, through sglang 0.5.23's own multimodal processors."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from sglang.srt.managers.io_struct import GenerateReqInput
from sglang.srt.managers.schedule_batch import MultimodalInputFormat
from sglang.srt.multimodal.processors.kimi_common import KimiGridMMDataMixin, _item_grid_thw
from sglang.srt.multimodal.processors.kimi_k25 import _grid_thw_from_resize_config, navit_resize_config
from sglang.srt.multimodal.processors.qwen_vl import QwenVLImageProcessor
from sglang.srt.runtime_context import publish
from sglang.srt.server_args import ServerArgs
from transformers import AutoConfig, AutoImageProcessor
from vitcache.client import VitCacheClient
from vitcache.integrations.sglang import expand_image_tokens, image_embedding, precomputed_embedding

from .conftest import QWEN_FAMILIES, png, tiny_tokenizer

PROMPT = "describe <|vision_start|><|image_pad|><|vision_end|> and <|vision_start|><|image_pad|><|vision_end|> ."
IMAGES = (png(90, 60, seed=1), png(50, 120, seed=2))  # two sizes: two grids, two spans of tokens


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
        video_processor=getattr(transformers, video_cls)(),
    )
    server_args = ServerArgs(model_path=str(checkpoint), device="cpu")
    publish(server_args, role="test")
    return QwenVLImageProcessor(AutoConfig.from_pretrained(checkpoint), server_args, hf_processor, "default")


def process(processor: QwenVLImageProcessor, prompt: str, image_data: list):  # type: ignore[no-untyped-def]
    request = GenerateReqInput(text=prompt, image_data=image_data)
    return asyncio.run(processor.process_mm_data_async(image_data, prompt, request))


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_qwen_precomputed_matches_sglang_processing_the_images(family, checkpoints, vitcache_targets):
    processor = sglang_qwen_processor(family, checkpoints[family])
    with VitCacheClient(vitcache_targets[family]) as client:
        results = [result.raise_for_error() for result in client.encode(list(IMAGES))]

    from_images = process(processor, PROMPT, [Image.open(io.BytesIO(data)).convert("RGB") for data in IMAGES])
    item = precomputed_embedding(results, family)
    from_vitcache = process(processor, expand_image_tokens(PROMPT, results, family), [item])

    # The same tokens and M-RoPE positions as when SGLang preprocesses the images itself.
    assert from_vitcache.input_ids == from_images.input_ids
    assert torch.equal(from_vitcache.mrope_positions, from_images.mrope_positions)
    assert torch.equal(*(torch.as_tensor(out.mrope_position_delta) for out in (from_vitcache, from_images)))
    # The same image spans and grids, the embeddings in place of the pixels (one bundled precomputed item).
    (precomputed,) = from_vitcache.mm_items
    assert precomputed.format == MultimodalInputFormat.PRECOMPUTED_EMBEDDING
    assert precomputed.offsets == [span for image in from_images.mm_items for span in image.offsets]
    grids = torch.cat([torch.as_tensor(image.image_grid_thw).reshape(-1, 3) for image in from_images.mm_items])
    assert torch.equal(torch.as_tensor(precomputed.model_specific_data["image_grid_thw"]), grids)
    assert precomputed.hash == item["hash"]
    assert torch.equal(precomputed.feature, torch.cat([image_embedding(r) for r in results]))
    assert sum(end - start + 1 for start, end in precomputed.offsets) == precomputed.feature.shape[0]


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


def test_kimi_k25_item_matches_sglang_kimi_preprocessing(checkpoints, vitcache_targets):
    # SGLang's Kimi-K2.5 processor needs the checkpoint's remote-code HF processor, which a tiny checkpoint has
    # not: its grid and token arithmetic and its identity rules are checked one by one.
    import json

    from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem

    preprocessor = json.loads((checkpoints["kimi_k25"] / "preprocessor_config.json").read_text())
    with VitCacheClient(vitcache_targets["kimi_k25"]) as client:
        results = [result.raise_for_error() for result in client.encode(list(IMAGES))]
    for data, result in zip(IMAGES, results, strict=True):
        width, height = Image.open(io.BytesIO(data)).size
        resize = navit_resize_config(
            width,
            height,
            patch_size=preprocessor["patch_size"],
            merge_kernel_size=preprocessor["merge_size"],
            in_patch_limit=preprocessor["max_patches"],
            patch_limit_on_one_side=preprocessor["size"]["max_height"],
        )
        item = precomputed_embedding([result], "kimi_k25")
        assert item["feature"].shape[0] == resize["num_tokens"]
        grid = {"image_grid_thw": item["image_grid_thw"]}
        sglang_item = MultimodalDataItem(modality=Modality.IMAGE, model_specific_data=grid)
        assert tuple(_item_grid_thw(sglang_item)) == _grid_thw_from_resize_config(resize, preprocessor["patch_size"])
        KimiGridMMDataMixin.reject_caller_image_identity([item], None)  # no caller identity: SGLang accepts it
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
