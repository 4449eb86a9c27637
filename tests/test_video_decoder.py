"""--video-decoder: NVDEC where PyAV can open it on the encoder's GPU, else FFmpeg's software decoders, with the
same frames and the same per-video errors either way. On a machine without CUDA (these tests' machine), ``auto``
decodes in software, ``cuda`` is refused at start-up in one line, and a HWAccel that cannot open decodes in software.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from av.codec.hwaccel import HWAccel
from vitcache.server import cli

from vitcache.config import VitcacheConfig
from vitcache.encode.video_decode import VideoLimits, decode_frames, probe_video, video_hwaccel
from vitcache.errors import ConfigError, ImageRejected

from .test_config import failure
from .test_video import clip_frames, decode_all, encode_clip, faststart_clip

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="NVDEC may open on this machine")
SERVE = ("serve", "--port", "0", "--metrics-port", "0")


@no_cuda
def test_auto_decodes_on_the_cpu_where_nvdec_cannot_open_and_says_why_once(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="vitcache.encode.video_decode"):
        assert video_hwaccel("auto", torch.device("cuda:0")) is None
        assert video_hwaccel("auto", torch.device("cpu")) is None
        assert video_hwaccel("cpu", torch.device("cuda:0")) is None  # not even tried
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 2, said
    assert said[0].startswith("video files decode on the CPU: NVDEC cannot be opened on cuda:0 (")
    assert "libcuda" in said[0] or "CUDA" in said[0]  # FFmpeg's own reason, not only an errno
    assert said[1] == "video files decode on the CPU: the encoder runs on cpu, not on a CUDA device"


@no_cuda
def test_cuda_without_nvdec_is_refused_with_what_to_do() -> None:
    with pytest.raises(ConfigError, match=r"^--video-decoder cuda: NVDEC cannot be opened on cuda:0 \(.*CUDA") as e:
        video_hwaccel("cuda", torch.device("cuda:0"))
    assert str(e.value).endswith("; use --video-decoder auto or cpu to decode on the CPU")


@pytest.mark.parametrize("encoder_process", ["off", "on"])
def test_serve_with_cuda_decoding_on_a_cpu_encoder_is_one_line(capfd, encoder_process: str) -> None:
    """In the serving process or in an encoder process (whose ConfigError the parent prints), no traceback."""
    line = failure(capfd, *SERVE, "--encoder-process", encoder_process, "--video-decoder", "cuda")
    assert line == (
        "vitcache serve: --video-decoder cuda: the encoder runs on cpu, not on a CUDA device; "
        "use --video-decoder auto or cpu to decode on the CPU"
    )


def test_the_setting_comes_from_flag_or_variable_and_is_checked(capfd, monkeypatch) -> None:
    assert VitcacheConfig().limits.video_decoder == "cpu"
    parser = cli.build_parser()
    variable = {"VITCACHE_VIDEO_DECODER": "auto"}
    assert cli.serve_config(parser.parse_args(["serve"]), variable).limits.video_decoder == "auto"
    flag = parser.parse_args(["serve", "--video-decoder", "cuda"])
    assert cli.serve_config(flag, variable).limits.video_decoder == "cuda"
    monkeypatch.setenv("VITCACHE_VIDEO_DECODER", "gpu")
    assert failure(capfd, *SERVE).startswith("vitcache serve: VITCACHE_VIDEO_DECODER='gpu': not one of auto, cpu, cuda")
    with pytest.raises(ConfigError, match=r"^--video-decoder='nvdec': not one of auto, cpu, cuda$"):
        VitcacheConfig.of(video_decoder="nvdec")


def nvdec() -> HWAccel:
    """What video_hwaccel gives on a GPU; here, one whose device context cannot open."""
    return HWAccel("cuda", device="0", allow_software_fallback=True, options={"primary_ctx": "1"})


def test_frames_are_the_software_decoders_whatever_the_decoder() -> None:
    """uint8 T x H x W x 3, equal to every frame PyAV decodes in software (here the HWAccel falls back)."""
    clip = encode_clip(clip_frames(12, 60, 80, seed=4))
    header = probe_video(clip, VideoLimits())
    assert header.pixel_format == "yuv420p"
    everything, _ = decode_all(clip)
    indices = [0, 3, 3, 11]
    for hwaccel in (None, nvdec()):
        frames = decode_frames(clip, header, indices, lambda: None, hwaccel)
        assert frames.dtype == np.uint8 and frames.shape == (4, 60, 80, 3)
        np.testing.assert_array_equal(frames, everything[indices])


def test_a_truncated_video_fails_alone_on_either_path(tmp_path: Path) -> None:
    whole = faststart_clip(clip_frames(12, 60, 80, seed=3), tmp_path / "faststart.mp4")
    truncated = whole[: len(whole) * 2 // 3]
    header = probe_video(truncated, VideoLimits())
    for hwaccel in (None, nvdec()):
        with pytest.raises(ImageRejected, match="truncated or damaged"):
            decode_frames(truncated, header, [0, 11], lambda: None, hwaccel)
