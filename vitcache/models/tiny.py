"""Tiny random full VLM checkpoints, for the built-in `tiny-random` model and for tests.

Real architectures (transformers classes, `save_pretrained` layout) with toy widths: the vision side keeps
the real shape conventions (patch/merge sizes, Qwen2.5 window attention, Qwen3 deepstack) so every code
path of the real models runs, in well under a second on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    Kimi_K25Config,
    Kimi_K25ForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD

_VOCAB = 512
# Special tokens inside the tiny vocabulary, so the full models' forward works on tiny inputs too.
_TOKENS = {"image_token_id": 500, "video_token_id": 501, "vision_start_token_id": 502, "vision_end_token_id": 503}
_QWEN_TEXT = {
    "vocab_size": _VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "bos_token_id": 0,
    "eos_token_id": 1,
}
# Sections of the 4 rotary frequencies of an 8-wide head over (t, h, w).
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
# Small processor limits keep test images at a few dozen patches; mean/std stay the class's CLIP defaults.
_QWEN_PIXELS = {"min_pixels": 4 * 28 * 28, "max_pixels": 128 * 28 * 28}


def _qwen2_vl() -> tuple[PretrainedConfig, type[PreTrainedModel], dict]:
    config = Qwen2VLConfig(
        text_config={**_QWEN_TEXT, "rope_parameters": _MROPE},
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2},
        **_TOKENS,
    )
    return config, Qwen2VLForConditionalGeneration, {"patch_size": 14, **_QWEN_PIXELS}


# Toy widths shared by the Qwen2.5-VL and Qwen3-VL towers (Qwen2-VL names its widths differently).
_QWEN_VISION = {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 32}


def _qwen2_5_vl() -> tuple[PretrainedConfig, type[PreTrainedModel], dict]:
    config = Qwen2_5_VLConfig(
        text_config={**_QWEN_TEXT, "rope_parameters": _MROPE},
        vision_config={
            **_QWEN_VISION,
            "window_size": 112,  # the real 8x8-patch windows
            "fullatt_block_indexes": [1, 3],
        },
        **_TOKENS,
    )
    return config, Qwen2_5_VLForConditionalGeneration, {"patch_size": 14, **_QWEN_PIXELS}


def _qwen3_vl() -> tuple[PretrainedConfig, type[PreTrainedModel], dict]:
    config = Qwen3VLConfig(
        text_config={**_QWEN_TEXT, "head_dim": 8, "rope_parameters": {**_MROPE, "mrope_interleaved": True}},
        vision_config={
            **_QWEN_VISION,
            "patch_size": 16,
            "num_position_embeddings": 64,  # an 8x8 learned grid, interpolated to each image
            "deepstack_visual_indexes": [1, 2],
        },
        **_TOKENS,
    )
    processor = {
        "patch_size": 16,
        "min_pixels": 4 * 32 * 32,
        "max_pixels": 128 * 32 * 32,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    return config, Qwen3VLForConditionalGeneration, processor


def _kimi_k25() -> tuple[PretrainedConfig, type[PreTrainedModel], dict]:
    config = Kimi_K25Config(
        projection_hidden_size=32,
        text_config={
            "model_type": "deepseek_v3",
            "vocab_size": _VOCAB,
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
        **_TOKENS,
    )
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
    return config, Kimi_K25ForConditionalGeneration, processor


_BUILDERS = {"qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "qwen3_vl": _qwen3_vl, "kimi_k25": _kimi_k25}


def make_tiny_checkpoint(family: str, path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random full model of `family` (safetensors) and its preprocessor_config.json to `path`."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}, expected one of {tuple(_BUILDERS)}")
    path = Path(path)
    config, model_cls, processor = _BUILDERS[family]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model_cls(config).save_pretrained(path)
    if family == "kimi_k25":
        (path / "preprocessor_config.json").write_text(json.dumps(processor, indent=2, sort_keys=True))
    else:
        Qwen2VLImageProcessorPil(**processor).save_pretrained(path)
    return path
