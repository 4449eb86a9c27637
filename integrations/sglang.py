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
BACKEND_NAME = "vitcache"


def _check_model_type(model_type: str) -> None:
    if model_type not in IMAGE_PAD_TOKENS:
        raise ValueError(f"unsupported model_type {model_type!r}, expected one of {tuple(IMAGE_PAD_TOKENS)}")


def image_embedding(result: EncodedImage) -> torch.Tensor:
    """One image's embedding as SGLang's model consumes it: (tokens, width). Qwen3-VL's deepstack features
    follow the merged tokens on the last dimension, the layout ``separate_deepstack_embeds`` splits."""
    result.raise_for_error()
    if len(result.embeddings) == 1:
        return result.embeddings[0]
    return torch.cat(result.embeddings, dim=-1)


def precomputed_embedding(results: Sequence[EncodedImage], model_type: str) -> dict[str, typing.Any]:
    """The one ``image_data`` item of an SGLang request whose images vitcache encoded, in prompt order.

    SGLang takes exactly one precomputed item per modality and request, so the images' embeddings are
    concatenated; ``image_grid_thw`` (one row per image) gives Qwen's M-RoPE positions and Kimi's token counts.
    The Qwen families also get ``hash`` (from the images' digests), SGLang's identity of the item for prefix
    caching, so it does not hash the tensor; SGLang 0.5.23 refuses caller identities for Kimi-K2.5, and its
    Kimi path takes one image per precomputed item. The prompt must hold the expanded placeholders:
    :func:`expand_image_tokens`.
    """
    _check_model_type(model_type)
    if not results:
        raise ValueError("no images")
    if model_type == "kimi_k25" and len(results) != 1:
        raise ValueError(f"SGLang takes one precomputed Kimi-K2.5 image per request, got {len(results)}")
    item: dict[str, typing.Any] = {
        "format": "precomputed_embedding",
        "feature": torch.cat([image_embedding(result) for result in results]),
        "image_grid_thw": torch.tensor([result.grid_thw for result in results], dtype=torch.long),
    }
    if model_type != "kimi_k25":
        digests = hashlib.blake2b(b"".join(result.digest for result in results), digest_size=8).digest()
        item["hash"] = int.from_bytes(digests, "big")
    return item


def expand_image_tokens(prompt: str, results: Sequence[EncodedImage], model_type: str) -> str:
    """``prompt`` with its i-th image placeholder repeated once per token of ``results[i]``, as SGLang's
    processor expands it for an image it preprocesses itself (a precomputed item is not expanded)."""
    _check_model_type(model_type)
    token = IMAGE_PAD_TOKENS[model_type]
    parts = prompt.split(token)
    if len(parts) != len(results) + 1:
        raise ValueError(f"the prompt has {len(parts) - 1} {token} placeholders for {len(results)} images")
    expanded = [parts[0]]
    for result, part in zip(results, parts[1:], strict=True):
        expanded.append(token * image_embedding(result).shape[0] + part)
    return "".join(expanded)


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
