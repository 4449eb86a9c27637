"""Tiny random full VLM checkpoints, for the built-in `tiny-random` model and for tests.

Real architectures (transformers classes, `save_pretrained` layout) with toy widths: the vision side keeps
the real shape conventions (patch/merge sizes, Qwen2.5 window attention, Qwen3 deepstack) so every code
path of the real models runs, in well under a second on CPU. Each family's config is its `tiny_config`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vitcache.models.registry import FAMILIES


def make_tiny_checkpoint(family: str, path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random full model of `family` (safetensors) and its preprocessor_config.json to `path`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}, expected one of {tuple(FAMILIES)}")
    model_family = FAMILIES[family]
    path = Path(path)
    config = model_family.tiny_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model_family.model_cls(config).save_pretrained(path)
    model_family.write_tiny_processor(path)
    return path
