"""vitcache: a per-image ViT embedding cache for vision-language model serving.

This package is the library (digests, cache tiers, model families, the device side of a miss, the
engine); it never imports gRPC. The server (``vitcache.server``), the client (``vitcache.client``)
and the integrations (``vitcache.integrations``) live in their own folders. In process::

    from vitcache import EncodedFile, VitcacheConfig, build_engine

    engine = await build_engine(VitcacheConfig.of(model="/models/Qwen2.5-VL-7B-Instruct", device="cuda"))
    await engine.start()
    async for outcome in engine.encode([EncodedFile(jpeg_bytes)]):
        print(outcome.index, outcome.source, outcome.entry.tensors())

The names below load on first use, so ``import vitcache.client`` (which imports this package first)
pulls in neither torch's model code nor transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    # settings and the composition root
    "VitcacheConfig": "vitcache.config",
    "ModelConfig": "vitcache.config",
    "build_engine": "vitcache.build",
    # the engine, what it takes and what it answers
    "EmbeddingEngine": "vitcache.engine",
    "EngineConfig": "vitcache.engine",
    "EncodedFile": "vitcache.inputs",
    "RawRGB": "vitcache.inputs",
    "PixelRows": "vitcache.inputs",
    "DigestOnly": "vitcache.inputs",
    "EncodedVideo": "vitcache.inputs",
    "RawVideo": "vitcache.inputs",
    "VideoSampling": "vitcache.inputs",
    "Scope": "vitcache.inputs",
    "ImageOutcome": "vitcache.outcomes",
    "Source": "vitcache.outcomes",
    "CachedEmbedding": "vitcache.cache.entry",
    "VideoTiming": "vitcache.wire.timing",
    "ImageError": "vitcache.errors",
    "ErrorCode": "vitcache.errors",
    "ConfigError": "vitcache.errors",
    "EngineObserver": "vitcache.observer",
    # the parts, for wiring an engine by hand
    "L1Cache": "vitcache.cache.l1",
    "RedisTier": "vitcache.cache.tiers",
    "load_encoder": "vitcache.models.loading",
    "EncoderLoader": "vitcache.models.loading",
    "VisionEncoder": "vitcache.models.loading",
    "ModelFamily": "vitcache.models.family",
    "FAMILIES": "vitcache.models.registry",
    "EncoderPool": "vitcache.encode.encoder_pool",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vitcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
