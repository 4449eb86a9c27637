"""Qwen2-VL: the vision tower's merged tokens; its preprocessing is shared by Qwen2.5-VL and Qwen3-VL."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    PretrainedConfig,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLVideoProcessor,
)

# The torchvision-backed module re-exports the same function but cannot be imported without torchvision.
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

from vitcache.errors import ImageRejected
from vitcache.models import accel
from vitcache.models.family import TINY_SPECIAL_TOKENS, TINY_VOCAB, ModelFamily, OutputLayout
from vitcache.models.preprocess import SUPPORTED_FLAGS, PreprocessConfig, check_supported
from vitcache.models.served import MaxPixelsPerFrame


@dataclass(frozen=True)
class Qwen2VLPreprocessConfig(PreprocessConfig):
    """`Qwen2VLImageProcessor`'s: images resized to multiples of patch_size * merge_size within a pixel budget."""

    kind = "qwen2_vl"
    min_pixels: int
    max_pixels: int

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> Qwen2VLPreprocessConfig:
        # The PIL processor class shares the torchvision one's config handling (size vs min/max_pixels).
        processor = Qwen2VLImageProcessorPil.from_pretrained(str(checkpoint_dir))
        check_supported({name: getattr(processor, name) for name in SUPPORTED_FLAGS}, checkpoint_dir)
        return cls(
            patch_size=processor.patch_size,
            temporal_patch_size=processor.temporal_patch_size,
            merge_size=processor.merge_size,
            min_pixels=processor.size["shortest_edge"],
            max_pixels=processor.size["longest_edge"],
            image_mean=tuple(processor.image_mean),
            image_std=tuple(processor.image_std),
            rescale_factor=processor.rescale_factor,
        )

    def target_size(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        try:
            resized = smart_resize(
                height,
                width,
                factor=self.patch_size * self.merge_size,
                min_pixels=self.min_pixels,
                max_pixels=self.max_pixels,
            )
        except ValueError as e:  # aspect ratio over 200
            raise ImageRejected(str(e)) from e
        return resized, resized

    @property
    def frame_limit(self) -> MaxPixelsPerFrame:
        return MaxPixelsPerFrame(self.patch_size, self.max_pixels)


TINY_TEXT = {
    "vocab_size": TINY_VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "bos_token_id": 0,
    "eos_token_id": 1,
}
# Sections of the 4 rotary frequencies of an 8-wide head over (t, h, w).
TINY_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
# Small processor limits keep test images at a few dozen patches; mean/std stay the class's CLIP defaults.
TINY_PIXELS = {"min_pixels": 4 * 28 * 28, "max_pixels": 128 * 28 * 28}


class Qwen2VL(ModelFamily):
    config_cls = Qwen2VLConfig
    model_cls = Qwen2VLForConditionalGeneration
    vision_cls = Qwen2VisionTransformerPretrainedModel
    tower_name = "visual"
    checkpoint_prefixes = ("visual.", "model.visual.")
    preprocess_cls = Qwen2VLPreprocessConfig
    cuda_graphs = True
    video_processor_cls = Qwen2VLVideoProcessor  # Qwen2.5-VL's too
    merged_width_name = "hidden_size"  # the vision config's name of the merger's output width

    def output_layout(self, config: PretrainedConfig) -> OutputLayout:
        vision_config = config.vision_config
        deepstack = getattr(vision_config, "deepstack_visual_indexes", ())
        names = ("merged", *(f"deepstack_{i}" for i in range(len(deepstack))))
        width = getattr(vision_config, self.merged_width_name)
        return OutputLayout(vision_config.spatial_merge_size, names, (width,) * len(names))

    def grid_metadata(self, tower: nn.Module, grid: torch.Tensor) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "position_ids": get_vision_position_ids(grid, tower.config.spatial_merge_size),
            "cu_seqlens": get_vision_cu_seqlens(grid),
        }
        meta["max_seqlen"] = accel.max_len(meta["cu_seqlens"])
        return meta

    def batch_metadata(self, tower: nn.Module, grids: list[tuple[int, int, int]]) -> dict[str, Any]:
        return accel.joined_metadata(self, tower, grids)

    def run_tower(
        self,
        modules: nn.ModuleDict,
        pixels: torch.Tensor,
        grid_thw: torch.Tensor,
        meta: dict[str, Any],
        preprocess_config: PreprocessConfig,
    ) -> list[torch.Tensor]:
        out = modules[self.tower_name](pixels, grid_thw=grid_thw, **meta)
        # Qwen3-VL also returns the features its LLM adds into early decoder layers ("deepstack").
        return [out.pooler_output, *(getattr(out, "deepstack_features", None) or ())]

    def tiny_config(self) -> PretrainedConfig:
        return self.config_cls(
            text_config={**TINY_TEXT, "rope_parameters": TINY_MROPE},
            vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2},
            **TINY_SPECIAL_TOKENS,
        )

    def tiny_processor_settings(self) -> dict[str, Any]:
        return {"patch_size": 14, **TINY_PIXELS}

    def write_tiny_processor(self, path: Path) -> None:
        Qwen2VLImageProcessorPil(**self.tiny_processor_settings()).save_pretrained(path)
