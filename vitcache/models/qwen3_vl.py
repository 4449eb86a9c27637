"""Qwen3-VL: Qwen2-VL's interface with a learned position table resampled per image, and deepstack outputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    PretrainedConfig,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLVideoProcessor,
    Qwen3VLVisionModel,
)

from vitcache.models import accel
from vitcache.models.family import TINY_SPECIAL_TOKENS
from vitcache.models.qwen2_5_vl import TINY_VISION
from vitcache.models.qwen2_vl import TINY_MROPE, TINY_TEXT, Qwen2VL


class Qwen3VL(Qwen2VL):
    config_cls = Qwen3VLConfig
    model_cls = Qwen3VLForConditionalGeneration
    vision_cls = Qwen3VLVisionModel
    merged_width_name = "out_hidden_size"
    video_processor_cls = Qwen3VLVideoProcessor

    def grid_metadata(self, tower: nn.Module, grid: torch.Tensor) -> dict[str, Any]:
        meta = super().grid_metadata(tower, grid)
        meta.update(accel.interpolation_metadata(tower, grid, spatial_merge_size=tower.config.spatial_merge_size))
        return meta

    def tiny_config(self) -> PretrainedConfig:
        return self.config_cls(
            text_config={**TINY_TEXT, "head_dim": 8, "rope_parameters": {**TINY_MROPE, "mrope_interleaved": True}},
            vision_config={
                **TINY_VISION,
                "patch_size": 16,
                "num_position_embeddings": 64,  # an 8x8 learned grid, interpolated to each image
                "deepstack_visual_indexes": [1, 2],
            },
            **TINY_SPECIAL_TOKENS,
        )

    def tiny_processor_settings(self) -> dict[str, Any]:
        return {
            "patch_size": 16,
            "min_pixels": 4 * 32 * 32,
            "max_pixels": 128 * 32 * 32,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        }
