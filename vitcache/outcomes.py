"""What the engine answers per image: where its embedding came from, or why there is none.

A leaf module, so the observer hook and the transports can name outcomes without importing the engine.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vitcache.cache.entry import CachedEmbedding
from vitcache.errors import ImageError


class Source(enum.IntEnum):
    """Where an image's embedding came from; values match the wire enum."""

    L1 = 1
    L2 = 2
    COMPUTED = 3


@dataclass(frozen=True)
class ImageOutcome:
    index: int
    digest: bytes
    entry: CachedEmbedding | None = None
    source: Source | None = None
    error: ImageError | None = None
    key: str = ""  # the Put key, for outcomes of fetch_keys (digest is then empty)
    cached: bool = True  # False: a video entry over max_cached_video_bytes, computed for this answer alone
    video_input: bool = False  # an error's input was a clip (a success tells by its entry)

    @property
    def is_video(self) -> bool:
        """A clip's outcome, counted apart from images in stats and metrics."""
        return self.entry.video is not None if self.entry is not None else self.video_input
