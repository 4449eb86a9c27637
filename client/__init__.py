"""vitcache client: ``VitCacheClient`` (blocking) and ``AsyncVitCacheClient`` (asyncio)."""

from .client import AsyncVitCacheClient, EncodedImage, ImageFailed, ImageLike, Video, VitCacheClient
from .connect import ConnectOptions
from .fleet import FleetClient

__all__ = [
    "AsyncVitCacheClient",
    "ConnectOptions",
    "EncodedImage",
    "FleetClient",
    "ImageFailed",
    "ImageLike",
    "Video",
    "VitCacheClient",
]
