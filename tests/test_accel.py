"""The fast path's model rewrites and precomputed metadata leave the towers' outputs unchanged (CPU, float32).

varlen attention itself needs CUDA: tests/test_models.py and tests/test_service.py cover it on a GPU.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from vitcache.config import ModelConfig
from vitcache.models import accel
from vitcache.models.loading import load_encoder
from vitcache.models.registry import FAMILIES
from vitcache.models.tiny import make_tiny_checkpoint

GRIDS = [(1, 4, 6), (1, 8, 8), (1, 6, 4)]


def _tower_and_inputs(family: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    encoder = load_encoder(ModelConfig(str(make_tiny_checkpoint(family, tmp_path / family)), "cpu", "float32"))
    tower = encoder.tower
    config = encoder.preprocess_config
    pixels = torch.randn(
        sum(t * h * w for t, h, w in GRIDS), config.patch_dim, generator=torch.Generator().manual_seed(0)
    )
    if family == "kimi_k25":
        pixels = pixels.view(-1, 3, config.patch_size, config.patch_size)
    return tower, pixels, torch.tensor(GRIDS)


@pytest.mark.parametrize("family", FAMILIES)
def test_rewrites_and_metadata_keep_outputs(family: str, tmp_path: Path) -> None:
    tower, pixels, grid = _tower_and_inputs(family, tmp_path)
    fast = copy.deepcopy(tower)
    accel.linear_patch_embed(fast)
    accel.pad_mlp_width(fast, multiple=64)
    assert isinstance(fast.patch_embed.proj, accel.PatchLinear)
    with torch.inference_mode():
        want = tower(pixels, grid_thw=grid).pooler_output
        got = fast(pixels, grid_thw=grid, **FAMILIES[family].batch_metadata(fast, GRIDS)).pooler_output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mlp_is_padded_to_the_multiple_and_metadata_is_really_used(tmp_path: Path) -> None:
    tower, pixels, grid = _tower_and_inputs("qwen2_5_vl", tmp_path)
    widths = {block.mlp.down_proj.in_features for block in tower.blocks}
    accel.pad_mlp_width(tower, multiple=48)
    assert {block.mlp.down_proj.in_features for block in tower.blocks} == {-(-w // 48) * 48 for w in widths}
    meta = FAMILIES["qwen2_5_vl"].batch_metadata(tower, GRIDS)
    wrong = dict(meta, position_ids=torch.zeros_like(meta["position_ids"]))
    with torch.inference_mode():
        right = tower(pixels, grid_thw=grid, **meta).pooler_output
        broken = tower(pixels, grid_thw=grid, **wrong).pooler_output
    assert not torch.allclose(right, broken)  # the tower consumed the precomputed positions


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_batch_metadata_joined_from_cached_images_equals_the_helpers(family: str, tmp_path: Path) -> None:
    encoder = load_encoder(ModelConfig(str(make_tiny_checkpoint(family, tmp_path / family)), "cpu", "float32"))
    rng = torch.Generator().manual_seed(0)
    batches = [GRIDS, [(1, 4, 4)], [(2, 8, 12), (1, 4, 6), (3, 6, 4)]]
    batches += [[(int(t), 2 * int(h), 2 * int(w)) for t, h, w in torch.randint(1, 9, (5, 3), generator=rng)]]
    for grids in batches:
        joined = FAMILIES[family].batch_metadata(encoder.tower, grids)
        direct = FAMILIES[family].grid_metadata(encoder.tower, torch.tensor(grids))
        assert joined.keys() == direct.keys()
        for name, value in direct.items():
            if torch.is_tensor(value):
                assert torch.equal(joined[name], value), name
            else:
                assert joined[name] == value, name
