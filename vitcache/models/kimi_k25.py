"""Kimi-K2.5: a MoonViT tower that pools each merge window (and a clip's frames), then the multimodal projector."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    Kimi_K25Config,
    Kimi_K25ForConditionalGeneration,
    Kimi_K25VisionModel,
    PretrainedConfig,
)
from transformers.image_processing_utils import ImageProcessingMixin
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD
from transformers.modeling_utils import local_torch_dtype
from transformers.models.kimi_k25.modeling_kimi_k25 import (
    Kimi_K25MultimodalProjection,
    get_vision_frame_index,
    get_vision_temporal_merge_index,
)
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

from vitcache.models import accel
from vitcache.models.family import TINY_SPECIAL_TOKENS, TINY_VOCAB, ModelFamily, ModelLoadError, OutputLayout
from vitcache.models.preprocess import SUPPORTED_FLAGS, PreprocessConfig, check_supported
from vitcache.models.served import NavitFrameLimit

# `Kimi_K25ImageProcessor`'s class defaults, used where preprocessor_config.json leaves a value out. Restated
# because that class's module imports torchvision; tests check them against it where torchvision exists.
KIMI_DEFAULTS = {
    "patch_size": 14,
    "merge_size": 2,
    "max_patches": 16384,
    "size": {"max_height": 512, "max_width": 512},
    "image_mean": IMAGENET_STANDARD_MEAN,
    "image_std": IMAGENET_STANDARD_STD,
    "rescale_factor": 1 / 255,
}


@dataclass(frozen=True)
class KimiK25PreprocessConfig(PreprocessConfig):
    """`Kimi_K25ImageProcessor`'s: images within a patch budget and a side limit, zero-padded to the merge size."""

    kind = "kimi_k25"
    max_patches: int
    max_size_per_side: int

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> KimiK25PreprocessConfig:
        saved, _ = ImageProcessingMixin.get_image_processor_dict(str(checkpoint_dir))
        values = {**KIMI_DEFAULTS, **SUPPORTED_FLAGS, **saved}
        check_supported({name: values[name] for name in SUPPORTED_FLAGS}, checkpoint_dir)
        if values["size"].get("max_width") != values["size"]["max_height"]:  # HF refuses it too
            raise ValueError(f"Kimi's size must have equal max_height and max_width, got {values['size']}")
        return cls(
            patch_size=values["patch_size"],
            temporal_patch_size=1,  # Kimi embeds each frame on its own and pools frames after the tower
            merge_size=values["merge_size"],
            max_patches=values["max_patches"],
            max_size_per_side=values["size"]["max_height"],
            image_mean=tuple(values["image_mean"]),
            image_std=tuple(values["image_std"]),
            rescale_factor=values["rescale_factor"],
        )

    def target_size(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        try:
            from transformers.models.kimi_k25.image_processing_kimi_k25 import navit_resize
        except ImportError as e:
            raise RuntimeError(
                "Kimi-K2.5 preprocessing needs torchvision: transformers' navit_resize lives in a module importing it"
            ) from e
        return navit_resize(
            height,
            width,
            patch_size=self.patch_size,
            merge_kernel_size=self.merge_size,
            max_patches=self.max_patches,
            max_size_per_side=self.max_size_per_side,
        )

    @property
    def frame_limit(self) -> NavitFrameLimit:
        return NavitFrameLimit(self.merge_size, self.max_size_per_side, self.max_patches)

    @property
    def patch_group(self) -> int:
        return 1  # raster order: the tower merges windows itself


class KimiK25(ModelFamily):
    config_cls = Kimi_K25Config
    model_cls = Kimi_K25ForConditionalGeneration
    vision_cls = Kimi_K25VisionModel
    tower_name = "vision_tower"
    checkpoint_prefixes = ("vision_tower.", "model.vision_tower.", "mm_projector.", "model.mm_projector.")
    preprocess_cls = KimiK25PreprocessConfig
    cuda_graphs = False  # the pooling takes more than the metadata

    def output_layout(self, config: PretrainedConfig) -> OutputLayout:
        vision_config = config.vision_config
        kernel_h, kernel_w = vision_config.merge_kernel_size
        if kernel_h != kernel_w:
            raise ModelLoadError(f"non-square Kimi merge kernel {vision_config.merge_kernel_size} is unsupported")
        return OutputLayout(
            kernel_h,
            ("merged",),
            (config.text_config.hidden_size,),
            max_frames=vision_config.pos_emb_time,
            pools_frames=True,
        )

    def describe(self, config: PretrainedConfig) -> dict[str, Any]:
        return {
            "projector": {
                "projection_hidden_size": config.projection_hidden_size,
                "projection_layer_norm_eps": config.projection_layer_norm_eps,
                "output_hidden_size": config.text_config.hidden_size,
            }
        }

    def extra_modules(self, config: PretrainedConfig, dtype: torch.dtype) -> dict[str, nn.Module]:
        with local_torch_dtype(dtype):
            return {"mm_projector": Kimi_K25MultimodalProjection(config)}

    def grid_metadata(self, tower: nn.Module, grid: torch.Tensor) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "position_ids": get_vision_position_ids(grid, spatial_merge_size=1),
            "cu_seqlens": get_vision_cu_seqlens(grid, merge_temporal=True),
            "frame_index": get_vision_frame_index(grid),
            "temporal_merge_index": get_vision_temporal_merge_index(grid, *tower.merge_kernel_size),
        }
        meta["max_seqlen"] = accel.max_len(meta["cu_seqlens"])
        meta.update(accel.interpolation_metadata(tower, grid))
        return meta

    def run_tower(
        self,
        modules: nn.ModuleDict,
        pixels: torch.Tensor,
        grid_thw: torch.Tensor,
        meta: dict[str, Any],
        preprocess_config: PreprocessConfig,
    ) -> list[torch.Tensor]:
        # As Kimi_K25Model.get_image_features: the tower pools each merge window, the projector embeds it.
        patch = preprocess_config.patch_size
        pooled = modules[self.tower_name](pixels.view(-1, 3, patch, patch), grid_thw=grid_thw, **meta).pooler_output
        return [modules["mm_projector"](pooled).squeeze(1)]

    def tiny_config(self) -> PretrainedConfig:
        return self.config_cls(
            projection_hidden_size=32,
            text_config={
                "model_type": "deepseek_v3",
                "vocab_size": TINY_VOCAB,
                "hidden_size": 32,
                "intermediate_size": 64,
                "moe_intermediate_size": 16,
                "num_hidden_layers": 2,
                "first_k_dense_replace": 1,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "n_routed_experts": 4,
                "num_experts_per_tok": 2,
                "n_group": 1,
                "topk_group": 1,
                "q_lora_rank": 16,
                "kv_lora_rank": 16,
                "qk_rope_head_dim": 8,
                "qk_nope_head_dim": 8,
                "v_head_dim": 8,
            },
            vision_config={
                "num_hidden_layers": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_attention_heads": 4,
                "pos_emb_height": 8,
                "pos_emb_width": 8,
            },
            **TINY_SPECIAL_TOKENS,
        )

    def write_tiny_processor(self, path: Path) -> None:
        # Kimi_K25ImageProcessor needs torchvision, so its config is written as the JSON it would save.
        processor = {
            "image_processor_type": "Kimi_K25ImageProcessor",
            "do_resize": True,
            "resample": 3,
            "size": {"max_height": 32, "max_width": 32},  # in patches per side
            "max_patches": 256,
            "patch_size": 14,
            "merge_size": 2,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(IMAGENET_STANDARD_MEAN),
            "image_std": list(IMAGENET_STANDARD_STD),
            "do_convert_rgb": True,
        }
        (path / "preprocessor_config.json").write_text(json.dumps(processor, indent=2, sort_keys=True))
