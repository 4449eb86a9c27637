"""SGLang adapters: vitcache results as SGLang ``precomputed_embedding`` inputs, and the ``vitcache`` backend of
SGLang encoder servers' global embedding cache (``--mm-global-cache-backend vitcache``).

Imports only vitcache's client side and torch; sglang is imported by :func:`register` alone, which SGLang calls
as a general plugin (the ``sglang.srt.plugins`` entry point) in the process that parses its command line.
The backend class itself lives in ``vitcache.integrations.sglang_store`` (it subclasses sglang's ``EmbeddingStore``).
"""

from __future__ import annotations

import hashlib
import typing
from collections.abc import Sequence

import torch
from vitcache.client import EncodedImage

# The placeholder SGLang's processor matches per image, which a precomputed request repeats once per token.
IMAGE_PAD_TOKENS = {
    "qwen2_vl": "<|image_pad|>",
    "qwen2_5_vl": "<|image_pad|>",
    "qwen3_vl": "<|image_pad|>",
    "kimi_k25": "<|media_pad|>",
}
# The Qwen families' video placeholder (videos: Qwen families only).
VIDEO_PAD_TOKEN = "<|video_pad|>"
BACKEND_NAME = "vitcache"


def _check_model_type(model_type: str) -> None:
    if model_type not in IMAGE_PAD_TOKENS:
        raise ValueError(f"unsupported model_type {model_type!r}, expected one of {tuple(IMAGE_PAD_TOKENS)}")


def image_embedding(result: EncodedImage) -> torch.Tensor:
    """One image's or video's embedding as SGLang's model consumes it: (tokens, width). Qwen3-VL's deepstack
    features follow the merged tokens on the last dimension, the layout ``separate_deepstack_embeds`` splits."""
    result.raise_for_error()
    if len(result.embeddings) == 1:
        return result.embeddings[0]
    return torch.cat(result.embeddings, dim=-1)


def _is_video(results: Sequence[EncodedImage], model_type: str) -> bool:
    """Whether ``results`` are videos (all of them) or images (none): SGLang takes each modality as its own item."""
    videos = sum(result.video is not None for result in results)
    if videos not in (0, len(results)):
        raise ValueError(
            f"{videos} of {len(results)} results are videos: images go in image_data and videos in video_data, "
            "one precomputed item each"
        )
    if videos and model_type == "kimi_k25":
        raise ValueError("vitcache has no Kimi-K2.5 video path")
    return videos > 0


def precomputed_embedding(results: Sequence[EncodedImage], model_type: str) -> dict[str, typing.Any]:
    """The one ``image_data`` (or, for videos, ``video_data``) item of an SGLang request whose images (videos)
    vitcache encoded, in prompt order.

    SGLang takes exactly one precomputed item per modality and request, so the embeddings are concatenated;
    ``image_grid_thw`` / ``video_grid_thw`` (one row per image or video) gives Qwen's M-RoPE positions and Kimi's
    token counts, Qwen2.5-VL videos add ``second_per_grid_ts`` (their M-RoPE time step). The Qwen families also
    get ``hash`` (from the digests), SGLang's identity of the item for prefix caching, so it does not hash the
    tensor; SGLang 0.5.23 refuses caller identities for Kimi-K2.5, and its Kimi path takes one image per
    precomputed item. The prompt must hold the expanded placeholders: :func:`expand_image_tokens`,
    :func:`expand_video_tokens`.
    """
    _check_model_type(model_type)
    if not results:
        raise ValueError("no images")
    if model_type == "kimi_k25" and len(results) != 1:
        raise ValueError(f"SGLang takes one precomputed Kimi-K2.5 image per request, got {len(results)}")
    is_video = _is_video(results, model_type)
    grids = torch.tensor([result.grid_thw for result in results], dtype=torch.long)
    item: dict[str, typing.Any] = {
        "format": "precomputed_embedding",
        "feature": torch.cat([image_embedding(result) for result in results]),
        "video_grid_thw" if is_video else "image_grid_thw": grids,
    }
    if is_video and model_type == "qwen2_5_vl":
        item["second_per_grid_ts"] = torch.tensor([result.video.second_per_grid_ts for result in results])
    if model_type != "kimi_k25":
        digests = hashlib.blake2b(b"".join(result.digest for result in results), digest_size=8).digest()
        item["hash"] = int.from_bytes(digests, "big")
    return item


def _expand(prompt: str, token: str, replacements: Sequence[str], what: str) -> str:
    """``prompt`` with its i-th ``token`` replaced by ``replacements[i]``."""
    parts = prompt.split(token)
    if len(parts) != len(replacements) + 1:
        raise ValueError(f"the prompt has {len(parts) - 1} {token} placeholders for {len(replacements)} {what}")
    return parts[0] + "".join(replacement + part for replacement, part in zip(replacements, parts[1:], strict=True))


def expand_image_tokens(prompt: str, results: Sequence[EncodedImage], model_type: str) -> str:
    """``prompt`` with its i-th image placeholder repeated once per token of ``results[i]``, as SGLang's
    processor expands it for an image it preprocesses itself (a precomputed item is not expanded)."""
    _check_model_type(model_type)
    token = IMAGE_PAD_TOKENS[model_type]
    return _expand(prompt, token, [token * image_embedding(result).shape[0] for result in results], "images")


def expand_video_tokens(prompt: str, results: Sequence[EncodedImage], model_type: str) -> str:
    """``prompt`` with its i-th ``<|video_pad|>`` expanded for the video ``results[i]`` as the model's processor
    expands it for a video it preprocesses itself: one pad per token (Qwen2-VL, Qwen2.5-VL), or per temporal
    group ``<{seconds:.1f} seconds><|vision_start|>`` + its pads + ``<|vision_end|>`` (Qwen3-VL, whose
    timestamps are text in the prompt)."""
    _check_model_type(model_type)
    if not _is_video(results, model_type):
        raise ValueError("expand_video_tokens takes videos; images go through expand_image_tokens")

    def expanded(result: EncodedImage) -> str:
        groups = result.grid_thw[0]
        if model_type != "qwen3_vl":
            return VIDEO_PAD_TOKEN * image_embedding(result).shape[0]
        per_group = VIDEO_PAD_TOKEN * (image_embedding(result).shape[0] // groups)
        assert result.video is not None  # _is_video
        return "".join(
            f"<{seconds:.1f} seconds><|vision_start|>{per_group}<|vision_end|>" for seconds in result.video.timestamps
        )

    return _expand(prompt, VIDEO_PAD_TOKEN, [expanded(result) for result in results], "videos")


def register() -> None:
    """Registers the ``vitcache`` embedding-store backend with SGLang and lets ``--mm-global-cache-backend``
    accept it (SGLang 0.5.23 lists only ``mooncake``). SGLang runs this as a general plugin at start-up; a
    launcher of your own calls it before SGLang parses its arguments."""
    import msgspec
    from sglang.srt.arg_groups.arg_utils import _unwrap_annotated
    from sglang.srt.mem_cache.embedding_store import EmbeddingStoreFactory
    from sglang.srt.server_args import ServerArgs

    EmbeddingStoreFactory.register_backend(BACKEND_NAME, "vitcache.integrations.sglang_store", "VitcacheEmbeddingStore")
    field = "mm_global_cache_backend"
    inner, arg = _unwrap_annotated(ServerArgs.__annotations__[field])
    if arg is not None and arg.choices is not None and BACKEND_NAME not in arg.choices:
        widened = msgspec.structs.replace(arg, choices=[*arg.choices, BACKEND_NAME])
        ServerArgs.__annotations__[field] = typing.Annotated[inner, widened]
