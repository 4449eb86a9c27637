"""Qwen2.5-VL: Qwen2-VL's interface with window attention in most blocks and a differently named merger width."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.vision_utils import get_vision_window_index

from vitcache.models import accel
from vitcache.models.family import TINY_SPECIAL_TOKENS
from vitcache.models.qwen2_vl import TINY_MROPE, TINY_TEXT, Qwen2VL

# Toy widths shared by the Qwen2.5-VL and Qwen3-VL towers (Qwen2-VL names its widths differently).
TINY_VISION = {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 32}


class Qwen2_5VL(Qwen2VL):
    config_cls = Qwen2_5_VLConfig
    model_cls = Qwen2_5_VLForConditionalGeneration
    vision_cls = Qwen2_5_VisionTransformerPretrainedModel
    merged_width_name = "out_hidden_size"

    def grid_metadata(self, tower: nn.Module, grid: torch.Tensor) -> dict[str, Any]:
        meta = super().grid_metadata(tower, grid)
        config = tower.config
        window_index, cu_window = get_vision_window_index(
            grid, config.spatial_merge_size, config.window_size, config.patch_size
        )
        meta.update(window_index=window_index, cu_window_seqlens=cu_window, max_window_seqlen=accel.max_len(cu_window))
        return meta

    def tiny_config(self) -> PretrainedConfig:
        return self.config_cls(
            text_config={**TINY_TEXT, "rope_parameters": TINY_MROPE},
            vision_config={
                **TINY_VISION,
                "window_size": 112,  # the real 8x8-patch windows
                "fullatt_block_indexes": [1, 3],
            },
            **TINY_SPECIAL_TOKENS,
        )
