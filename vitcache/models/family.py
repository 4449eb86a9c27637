"""The protocol of a model family: everything vitcache needs to know about one VLM architecture.

Each family is one file (vitcache/models/<model_type>.py) with a :class:`ModelFamily` subclass, and one
line in vitcache/models/registry.py keyed by its checkpoints' ``model_type``. The loading, preprocessing,
acceleration and CUDA-graph machinery is generic and asks the family through these hooks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.video_processing_utils import BaseVideoProcessor

from vitcache.errors import ConfigError
from vitcache.models.preprocess import PreprocessConfig

# Tiny checkpoints' vocabulary and special tokens (inside it), so the full models' forward works on tiny inputs
# too; tests of the integrations (tests/sglang) build tokenizers around them.
TINY_VOCAB = 512
TINY_SPECIAL_TOKENS = {
    "image_token_id": 500,
    "video_token_id": 501,
    "vision_start_token_id": 502,
    "vision_end_token_id": 503,
}


class ModelLoadError(ConfigError):
    """The checkpoint or device cannot give a correct vision encoder (missing files, weights, unsupported model)."""


@dataclass(frozen=True)
class OutputLayout:
    """What the encoder returns per image, read from the model's config."""

    merge_size: int  # grids' h and w are multiples of it; merge_size x merge_size patches make one token
    names: tuple[str, ...]
    hidden_sizes: tuple[int, ...]  # one per name
    max_frames: int | None = None  # clips longer than this are refused
    pools_frames: bool = False  # a clip's frames are averaged into one set of tokens (else every frame has its own)


class ModelFamily(ABC):
    """How to read, load, preprocess for and run one family's vision encoder. Stateless: the registry holds
    one instance per family, shared by every encoder of it."""

    config_cls: type[PretrainedConfig]  # the checkpoint's config.json
    model_cls: type[PreTrainedModel]  # the full model: only instantiated on the meta device, to map checkpoint keys
    vision_cls: type[PreTrainedModel]  # the vision tower, built from config.vision_config
    tower_name: str  # attribute of `model_cls.model` holding the tower; its key in the encoder's modules
    checkpoint_prefixes: tuple[str, ...]  # checkpoint keys under these are the encoder's, in any known layout
    preprocess_cls: type[PreprocessConfig]
    cuda_graphs = False  # whether the forward takes nothing but batch_metadata, so graphs.py can pad and capture it
    # transformers' video processor, whose pixel_values_videos the tower takes as it takes images' (None: no videos)
    video_processor_cls: type[BaseVideoProcessor] | None = None

    @abstractmethod
    def output_layout(self, config: PretrainedConfig) -> OutputLayout:
        """Raises ModelLoadError for a config this family's forward does not support."""

    def describe(self, config: PretrainedConfig) -> dict[str, Any]:
        """Config values outside ``vision_config`` that the encoder's outputs depend on (hashed into the namespace)."""
        return {}

    def extra_modules(self, config: PretrainedConfig, dtype: torch.dtype) -> dict[str, nn.Module]:
        """Modules run after the tower (keyed as in the full model's ``model``), allocated on the current device."""
        return {}

    @abstractmethod
    def grid_metadata(self, tower: nn.Module, grid: torch.Tensor) -> dict[str, Any]:
        """Everything the tower derives from an (images, 3) int64 ``grid_thw``, computed on the CPU with
        transformers' helpers; keys are the ones the tower's forward takes as kwargs."""

    def batch_metadata(self, tower: nn.Module, grids: list[tuple[int, int, int]]) -> dict[str, Any]:
        """``grid_metadata`` of a batch; a family may compute it faster (see accel.joined_metadata)."""
        return self.grid_metadata(tower, torch.tensor(grids, dtype=torch.int64))

    @abstractmethod
    def run_tower(
        self,
        modules: nn.ModuleDict,
        pixels: torch.Tensor,
        grid_thw: torch.Tensor,
        meta: dict[str, Any],
        preprocess_config: PreprocessConfig,
    ) -> list[torch.Tensor]:
        """The forward of packed ``pixels`` (patches, patch_dim) with ``meta`` as kwargs (empty: the tower
        derives it): one tensor per output name, one row per token."""

    @abstractmethod
    def tiny_config(self) -> PretrainedConfig:
        """A full model's config with toy widths but the real shape conventions, for tests and tiny-random."""

    @abstractmethod
    def write_tiny_processor(self, path: Path) -> None:
        """Writes the tiny checkpoint's preprocessor_config.json to the directory ``path``."""
