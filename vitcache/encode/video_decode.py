"""Video files to sampled RGB frames with PyAV, every bound checked from the container's header first.

A video is probed (header and packet index only, no frame decoded) for its frame count, frame rate
and frame size; those are held to :class:`VideoLimits` and give the frames to sample, and only then
are frames decoded, one at a time, keeping the sampled ones. A frame of another size than the header
said, or a stream that ends before its header's frame count, is refused: the bound on decoded bytes
was taken from the header.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from vitcache.config import LimitsConfig
from vitcache.errors import ImageRejected

VIDEO_FORMATS = "MP4, WebM or MKV (H.264, H.265, VP8, VP9, AV1, ...)"
# FFmpeg's demuxers of those containers. It opens many more formats (image sequences, playlists that name
# other files, ...): attack surface and inputs no video request needs, so a file any other one opens is refused.
_DEMUXERS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"})


@dataclass(frozen=True)
class VideoLimits:
    """The video decoder's share of :class:`~vitcache.config.LimitsConfig` (help and units there)."""

    max_video_bytes: int = LimitsConfig.max_video_bytes
    max_video_seconds: float = LimitsConfig.max_video_seconds
    max_video_frames: int = LimitsConfig.max_video_frames
    max_video_frame_pixels: int = LimitsConfig.max_video_frame_pixels
    # Frames read (decoded, sampled or not) from one file: bounds the decoding work of a long, dense stream.
    max_video_source_frames: int = 216_000


@dataclass(frozen=True)
class VideoHeader:
    """What the container says of its first video stream."""

    frames: int
    fps: float
    height: int
    width: int

    @property
    def duration(self) -> float:
        return self.frames / self.fps


def _container(data: bytes | memoryview) -> av.container.InputContainer:
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.FFmpegError, ValueError, UnicodeDecodeError) as e:
        raise ImageRejected(f"not a decodable video: its bytes are no {VIDEO_FORMATS} file ({e})") from e
    if container.format.name not in _DEMUXERS:
        container.close()
        raise ImageRejected(f"not a decodable video: a {container.format.name} file, not {VIDEO_FORMATS}")
    return container


def check_frame_count(frames: int, limits: VideoLimits) -> None:
    """Raises ImageRejected for a video of more sampled frames than ``max_video_frames``."""
    if frames > limits.max_video_frames:
        raise ImageRejected(f"{frames} frames sampled is over the limit of {limits.max_video_frames} per video")


def check_frame_size(height: int, width: int, limits: VideoLimits) -> None:
    if height <= 0 or width <= 0:
        raise ImageRejected(f"video frames have zero size ({width}x{height})")
    if height * width > limits.max_video_frame_pixels:
        raise ImageRejected(
            f"video frames are {width}x{height} = {width * height} pixels, "
            f"over the limit of {limits.max_video_frame_pixels}"
        )


def probe_video(data: bytes | memoryview, limits: VideoLimits) -> VideoHeader:
    """The first video stream's frame count, rate and size, checked against ``limits`` (no frame decoded).

    Containers that do not store a frame count (WebM, MKV) have their packets counted, up to the
    ``max_video_source_frames`` bound.
    """
    if not len(data):
        raise ImageRejected("video is empty")
    if len(data) > limits.max_video_bytes:
        raise ImageRejected(f"video is {len(data)} bytes, over the limit of {limits.max_video_bytes}")
    with _container(data) as container:
        if not container.streams.video:
            raise ImageRejected("the file holds no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate or rate <= 0:
            raise ImageRejected("the video stream has no frame rate")
        check_frame_size(stream.codec_context.height, stream.codec_context.width, limits)
        frames = stream.frames
        if frames <= 0:
            frames = 0
            try:
                for packet in container.demux(stream):
                    frames += packet.size > 0
                    if frames > limits.max_video_source_frames:
                        break
            except av.FFmpegError as e:
                raise ImageRejected(f"not a decodable video: {e}") from e
        header = VideoHeader(frames, float(Fraction(rate)), stream.codec_context.height, stream.codec_context.width)
    if header.frames <= 0:
        raise ImageRejected("the video stream holds no frames")
    if header.frames > limits.max_video_source_frames:
        raise ImageRejected(f"video has over {limits.max_video_source_frames} frames, the limit of frames read")
    if not math.isfinite(header.duration) or header.duration > limits.max_video_seconds:
        raise ImageRejected(f"video lasts {header.duration:.1f} s, over the limit of {limits.max_video_seconds} s")
    return header


def decode_frames(
    data: bytes | memoryview, header: VideoHeader, indices: list[int], check_deadline: Callable[[], None]
) -> np.ndarray:
    """The frames at ``indices`` (ascending, repeats allowed) as (len(indices), H, W, 3) uint8 RGB.

    Decodes the stream in order and keeps only the sampled frames; whatever PyAV raises on a
    damaged stream becomes ImageRejected. ``check_deadline`` runs before each frame (decoding a
    long stream takes seconds), so a call whose deadline passes stops decoding.
    """
    wanted, last = set(indices), max(indices)
    kept: dict[int, np.ndarray] = {}
    with _container(data) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for position, frame in enumerate(container.decode(stream)):
                check_deadline()
                if (frame.height, frame.width) != (header.height, header.width):
                    raise ImageRejected(
                        f"frame {position} is {frame.width}x{frame.height}, not the "
                        f"{header.width}x{header.height} the video's header says"
                    )
                if position > last:
                    break
                if position in wanted:
                    kept[position] = frame.to_ndarray(format="rgb24")
                    if len(kept) == len(wanted):
                        break
        except av.FFmpegError as e:
            raise ImageRejected(f"the video is truncated or damaged: {e}") from e
    if len(kept) < len(wanted):
        raise ImageRejected(
            f"the video is truncated or damaged: frame {min(wanted - kept.keys())} of the {header.frames} its "
            "header says cannot be decoded"
        )
    return np.stack([kept[i] for i in indices])
