"""CUDA graphs of the forward: the padding they rely on (CPU) and the replays themselves (GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vitcache.config import ModelConfig
from vitcache.models.graphs import pad_batch
from vitcache.models.loading import load_encoder
from vitcache.models.preprocess import image_grid
from vitcache.models.registry import FAMILIES
from vitcache.models.tiny import make_tiny_checkpoint

# The last two share a bucket (one graph) but not their metadata, which each replay must load.
BATCHES = [
    [(1, 4, 6), (1, 8, 8), (1, 6, 4)],
    [(1, 8, 8)],
    [(1, 4, 4)] * 5,
    [(1, 10, 6), (1, 4, 8)],
    [(1, 16, 16)],
    [(1, 4, 6)],
    [(1, 6, 4)],
]


def _pixels(grids: list[tuple[int, int, int]], patch_dim: int, seed: int) -> torch.Tensor:
    rows = sum(t * h * w for t, h, w in grids)
    return torch.randn(rows, patch_dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", [name for name, family in FAMILIES.items() if family.cuda_graphs])
def test_filler_image_and_padded_boundaries_leave_real_tokens_unchanged(family: str, tmp_path: Path) -> None:
    """The padding a graph bucket applies, run through the towers' own (SDPA) forward on the CPU.

    SDPA cannot take the empty sequences that pad the boundary tensors (varlen attention on the
    GPU skips them: the GPU test below), so here they are checked to be pure repeats and dropped.
    """
    encoder = load_encoder(ModelConfig(str(make_tiny_checkpoint(family, tmp_path / family)), "cpu", "float32"))
    tower, merge = encoder.tower, encoder.merge_size
    for seed, grids in enumerate(BATCHES):
        pixels = _pixels(grids, encoder.preprocess_config.patch_dim, seed)
        grid = torch.tensor(grids)
        padded = pad_batch(FAMILIES[family], tower, merge, grids, patch_step=64)
        assert padded.patches == -(-pixels.shape[0] // 64) * 64  # the next multiple; no filler when it fits
        assert all(v & (v - 1) == 0 for v in padded.ints.values())  # powers of two
        filler = torch.randn(padded.patches - pixels.shape[0], pixels.shape[1])
        meta = dict(padded.tensors)
        for name in [name for name in meta if name.startswith("cu_")]:
            boundaries = torch.unique_consecutive(meta[name])
            assert (meta[name][len(boundaries) :] == boundaries[-1]).all()
            meta[name] = boundaries
        with torch.inference_mode():
            want = encoder._run_tower(pixels, grid, FAMILIES[family].batch_metadata(tower, grids))
            got = encoder._run_tower(torch.cat([pixels, filler]), grid, {**meta, **padded.ints})
        tokens = pixels.shape[0] // merge**2
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g[:tokens], w, rtol=1e-4, atol=1e-5)
    # Batches of one bucket share a key (one graph); another bucket is another key.
    same = [pad_batch(FAMILIES[family], tower, merge, grids, 64).key for grids in ([(1, 4, 6)], [(1, 6, 4)])]
    assert same[0] == same[1]
    assert pad_batch(FAMILIES[family], tower, merge, [(1, 8, 16)], 64).key != same[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_cuda_graph_replays_match_the_compiled_forward(family: str, tmp_path: Path) -> None:
    checkpoint = str(make_tiny_checkpoint(family, tmp_path / family))
    reference = load_encoder(ModelConfig(checkpoint, "cuda", "bfloat16", acceleration="varlen"))
    graphed = load_encoder(ModelConfig(checkpoint, "cuda", "bfloat16", acceleration="graphs"), graph_max_patches=512)
    assert graphed.graphs is not None
    # Each batch twice with new pixels: a replay must not return the previous batch's results, nor
    # use the metadata of another batch of its bucket.
    for seed, grids in enumerate(BATCHES * 2):
        pixels = _pixels(grids, reference.preprocess_config.patch_dim, seed).cuda()
        grid = torch.tensor(grids)
        want, got = reference.forward(pixels, grid), graphed.forward(pixels, grid)
        for got_image, want_image in zip(got, want, strict=True):
            for g, w in zip(got_image, want_image, strict=True):
                torch.testing.assert_close(g.float(), w.float(), rtol=0.05, atol=0.05)
    captured = graphed.graphs.captured
    assert 0 < captured < len(BATCHES)  # the second round replayed the first round's graphs, the last two one
    large = [(1, 24, 24)]  # 576 patches: over graph_max_patches, so the forward runs directly
    pixels = _pixels(large, reference.preprocess_config.patch_dim, 99).cuda()
    want, got = reference.forward(pixels, torch.tensor(large)), graphed.forward(pixels, torch.tensor(large))
    torch.testing.assert_close(got[0][0].float(), want[0][0].float(), rtol=0.05, atol=0.05)
    assert graphed.graphs.captured == captured


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_warmup_image_sizes_capture_every_batch_size_at_load(tmp_path: Path) -> None:
    checkpoint = str(make_tiny_checkpoint("qwen2_5_vl", tmp_path / "qwen2_5_vl"))
    plain = load_encoder(ModelConfig(checkpoint, "cuda", "bfloat16", acceleration="graphs"), graph_max_patches=512)
    grid = image_grid(84, 112, plain.preprocess_config)
    patches = grid[0] * grid[1] * grid[2]
    buckets = {
        pad_batch(FAMILIES["qwen2_5_vl"], plain.tower, plain.merge_size, [grid] * count, plain.graphs.patch_step).key
        for count in range(1, 512 // patches + 1)
    }
    assert plain.graphs.captured == 0
    warm = load_encoder(
        ModelConfig(checkpoint, "cuda", "bfloat16", acceleration="graphs", warmup_image_sizes=((112, 84),)),
        graph_max_patches=512,
    )
    assert warm.graphs.captured == len(buckets) > 1
    for count in (1, 512 // patches):  # served from the graphs captured at load
        pixels = _pixels([grid] * count, warm.preprocess_config.patch_dim, count).cuda()
        warm.forward(pixels, torch.tensor([grid] * count))
    assert warm.graphs.captured == len(buckets)
