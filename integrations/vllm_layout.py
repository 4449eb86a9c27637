"""vLLM's per-image (and per-video) encoder output layout, built from vitcache's outputs (no vLLM import, so the
main test suite checks it against transformers' own models: tests/test_vllm_layout.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def vllm_layout(family: str, embeddings: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The column blocks of what vLLM's ``embed_multimodal`` returns for one image or video, in order.

    Qwen2-VL, Qwen2.5-VL and Kimi-K2.5 return the merged tokens as they are; Qwen3-VL returns
    ``torch.cat([merged, *deepstack], dim=1)`` (vllm/model_executor/models/qwen3_vl.py, the vision
    tower's forward, which ``_process_video_input`` runs for videos too). Concatenating the returned blocks along
    dim 1 gives vLLM's tensor.
    """
    if family == "qwen3_vl":
        return list(embeddings)
    if len(embeddings) != 1:
        raise ValueError(f"a {family} entry has one output, this one has {len(embeddings)}")
    return [embeddings[0]]


def to_device(blocks: Sequence[torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """Concatenate ``blocks`` along dim 1 straight into a new tensor on ``device``: each byte is copied once."""
    rows = blocks[0].shape[0]
    out = torch.empty((rows, sum(b.shape[1] for b in blocks)), dtype=blocks[0].dtype, device=device)
    column = 0
    for block in blocks:
        out[:, column : column + block.shape[1]].copy_(block)
        column += block.shape[1]
    return out
