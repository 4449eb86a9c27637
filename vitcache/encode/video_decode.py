"""Video files to sampled RGB frames with PyAV, every bound checked from the container's header first.

A video is probed (header and packet index only, no frame decoded) for its frame count, frame rate
and frame size; those are held to :class:`VideoLimits` and give the frames to sample, and only then
are frames decoded, one at a time, keeping the sampled ones. A frame of another size than the header
said, or a stream that ends before its header's frame count, is refused: the bound on decoded bytes
was taken from the header.

Files decode with FFmpeg's software decoders, or with NVDEC on the encoder's GPU (``--video-decoder``,
chosen once by :func:`video_hwaccel`): the frames come back to the host either way, converted to RGB
from the software decoder's pixel format, so both paths give the same arrays.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import av
import av.logging
import numpy as np
import torch
from av.codec.hwaccel import HWAccel, hwdevices_available

from vitcache.config import LimitsConfig
from vitcache.errors import ConfigError, ImageRejected

log = logging.getLogger(__name__)

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
    pixel_format: str | None  # the software decoder's (yuv420p, ...); None where the header does not say

    @property
    def duration(self) -> float:
        return self.frames / self.fps


def video_hwaccel(decoder: str, device: torch.device) -> HWAccel | None:
    """What the encoder on ``device`` decodes video files with (``--video-decoder``): NVDEC (a HWAccel for
    av.open) or None, FFmpeg's software decoders. Chosen once, at start-up, and logged; raises ConfigError
    where ``cuda`` is asked for and NVDEC cannot be opened on ``device``."""
    if decoder == "cpu":
        return None
    hwaccel, problem = _open_nvdec(device)
    if hwaccel is not None:
        log.info("video files decode with NVDEC on %s", device)
    elif decoder == "cuda":
        raise ConfigError(f"--video-decoder cuda: {problem}; use --video-decoder auto or cpu to decode on the CPU")
    else:
        log.info("video files decode on the CPU: %s", problem)
    return hwaccel


def _open_nvdec(device: torch.device) -> tuple[HWAccel | None, str]:
    """A HWAccel for NVDEC on ``device`` (an index among the visible devices, as torch numbers them) once a
    device context opened there, or None and why not."""
    if device.type != "cuda":
        return None, f"the encoder runs on {device}, not on a CUDA device"
    if "cuda" not in hwdevices_available():
        return None, f"PyAV {av.__version__}'s FFmpeg has no CUDA hardware decoding"
    index = device.index or 0
    # primary_ctx: decode in the CUDA context torch made on the device, not a second one.
    hwaccel = HWAccel("cuda", device=str(index), allow_software_fallback=True, options={"primary_ctx": "1"})
    level = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)  # FFmpeg's reason ("Cannot load libcuda.so.1") joins the error's message
    try:
        with av.logging.Capture():
            hwaccel.create(av.Codec("h264", "r"))
    except av.FFmpegError as e:
        return None, f"NVDEC cannot be opened on cuda:{index} ({e})"
    finally:
        av.logging.set_level(level)
    return hwaccel, ""


def _container(data: bytes | memoryview, hwaccel: HWAccel | None = None) -> av.container.InputContainer:
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore", hwaccel=hwaccel)
    except (av.FFmpegError, ValueError, UnicodeDecodeError) as e:
        if hwaccel is not None:  # these bytes were probed in software: NVDEC failed, not the file
            log.warning("NVDEC could not open a video (%s): decoding it on the CPU", e)
            return _container(data)
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
        context = stream.codec_context
        pixel_format = context.format.name if context.format else None
        header = VideoHeader(frames, float(Fraction(rate)), context.height, context.width, pixel_format)
    if header.frames <= 0:
        raise ImageRejected("the video stream holds no frames")
    if header.frames > limits.max_video_source_frames:
        raise ImageRejected(f"video has over {limits.max_video_source_frames} frames, the limit of frames read")
    if not math.isfinite(header.duration) or header.duration > limits.max_video_seconds:
        raise ImageRejected(f"video lasts {header.duration:.1f} s, over the limit of {limits.max_video_seconds} s")
    return header


def decode_frames(
    data: bytes | memoryview,
    header: VideoHeader,
    indices: list[int],
    check_deadline: Callable[[], None],
    hwaccel: HWAccel | None = None,
) -> np.ndarray:
    """The frames at ``indices`` (ascending, repeats allowed) as (len(indices), H, W, 3) uint8 RGB.

    Decodes the stream in order (with ``hwaccel``, NVDEC, where it handles the stream's codec and
    profile; else in software) and keeps only the sampled frames; whatever PyAV raises on a damaged
    stream becomes ImageRejected. ``check_deadline`` runs before each frame (decoding a long stream
    takes seconds), so a call whose deadline passes stops decoding.
    """
    wanted, last = set(indices), max(indices)
    kept: dict[int, np.ndarray] = {}
    with _container(data, hwaccel) as container:
        stream = container.streams.video[0]
        if not stream.codec_context.is_hwaccel:
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
                    kept[position] = _rgb(frame, header.pixel_format)
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


def _rgb(frame: av.VideoFrame, pixel_format: str | None) -> np.ndarray:
    """The frame as H x W x 3 RGB. A frame NVDEC decoded comes back in its own layout (nv12, p010, ...): it is
    first rearranged into the software decoder's ``pixel_format`` (the same samples), so that the RGB
    conversion, and so every value, is the software path's."""
    if pixel_format is not None and frame.format.name != pixel_format:
        frame = frame.reformat(format=pixel_format)
    return frame.to_ndarray(format="rgb24")
