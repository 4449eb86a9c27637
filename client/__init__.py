"""vitcache client: ``VitCacheClient`` (blocking) and ``AsyncVitCacheClient`` (asyncio)."""

from .client import AsyncVitCacheClient, EncodedImage, ImageFailed, ImageLike, VitCacheClient

__all__ = ["AsyncVitCacheClient", "EncodedImage", "ImageFailed", "ImageLike", "VitCacheClient"]
