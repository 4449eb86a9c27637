"""NVDEC against FFmpeg's software decoders, as vitcache decodes video files (``--video-decoder cuda`` / ``cpu``).

    python bench/video_decode_probe.py                  # on a GPU machine; < 1 min; prints one JSON object
    python bench/video_decode_probe.py --device cpu     # anywhere: NVDEC unavailable, software timed alone

Makes a short H.264 clip with PyAV (bench/video_path.py's moving pattern; default 10 s of 1280x720 at 30 fps),
then decodes its sampled frames (every --every'th, as --fps 2 samples 30 fps) with
``vitcache.encode.video_decode.decode_frames``, in software and with the HWAccel ``video_hwaccel`` opens on
--device. Prints whether NVDEC opened (and why not), whether it decoded the stream, whether both paths gave
equal frames (the largest difference if not), and each path's median decode time over --repeats runs after
a warm-up.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import av
import numpy as np
import torch
from av.codec.hwaccel import HWAccel
from run_info import commit, utc_stamp
from video_path import make_clip

from vitcache.encode.video_decode import VideoLimits, decode_frames, probe_video, video_hwaccel
from vitcache.errors import ConfigError


def timed_decode(clip: bytes, indices: list[int], hwaccel: HWAccel | None, repeats: int) -> tuple[np.ndarray, float]:
    """The frames and the median milliseconds of ``repeats`` decodes (after one warm-up)."""
    header = probe_video(clip, VideoLimits())
    frames = decode_frames(clip, header, indices, lambda: None, hwaccel)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        decode_frames(clip, header, indices, lambda: None, hwaccel)
        times.append((time.perf_counter() - start) * 1000)
    return frames, round(statistics.median(times), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--every", type=int, default=15, help="decode every frame, keep every N-th")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    clip = make_clip(args.seconds, args.height, args.width, args.fps)
    header = probe_video(clip, VideoLimits())
    indices = list(range(0, header.frames, args.every))
    report: dict[str, object] = {
        "commit": commit(),
        "utc": utc_stamp(),
        "pyav": av.__version__,
        "device": args.device,
        "gpu": torch.cuda.get_device_name(args.device) if torch.cuda.is_available() else None,
        "clip": {"codec": "h264", "frames": header.frames, "size": f"{header.width}x{header.height}",
                 "pixel_format": header.pixel_format, "bytes": len(clip), "decoded_frames_kept": len(indices)},
    }  # fmt: skip
    try:
        hwaccel = video_hwaccel("cuda", torch.device(args.device))
        report["nvdec_available"], report["nvdec_unavailable_because"] = True, None
    except ConfigError as e:
        hwaccel = None
        report["nvdec_available"], report["nvdec_unavailable_because"] = False, str(e)
    cpu_frames, report["cpu_decode_ms"] = timed_decode(clip, indices, None, args.repeats)
    if hwaccel is not None:
        with av.open(io.BytesIO(clip), hwaccel=hwaccel) as container:
            report["nvdec_decodes_the_stream"] = container.streams.video[0].codec_context.is_hwaccel
        cuda_frames, report["cuda_decode_ms"] = timed_decode(clip, indices, hwaccel, args.repeats)
        report["frames_equal"] = bool(np.array_equal(cpu_frames, cuda_frames))
        difference = np.abs(cpu_frames.astype(np.int16) - cuda_frames.astype(np.int16))
        report["max_abs_difference"] = int(difference.max())
        report["frames_shape"] = [list(cpu_frames.shape), list(cuda_frames.shape)]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
