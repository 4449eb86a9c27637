"""A video miss end to end through the service against transformers' own video path, and a hit.

    python bench/video_path.py --model /models/Qwen2.5-VL-7B-Instruct --device cuda   # writes bench/results/
    python bench/video_path.py --model 7b-vision-random   # the 7B vision config with random weights (as miss_path.py)

A synthetic clip (default 30 s of 1280x720 at 30 fps, H.264, made here with PyAV) is sampled at
Qwen2.5-VL's default rate (--fps 2):

- transformers: PyAV decodes every frame, the model's video processor samples and preprocesses them on
  the device, ``get_video_features`` runs the vision tower (bf16, transformers' forward);
- vitcache miss: ``client.encode([Video(clip, fps=2)], hash_first=False)`` against a server on the same
  device (decode of the sampled frames + preprocessing + forward, then the answer over gRPC), the
  server's L1 emptied before each run (no Redis);
- vitcache hit: the same call again (L1).

Same process, same device, medians of --repeats runs after one warm-up each. Runs on the CPU with
``--model tiny-random --device cpu --seconds 2 --height 120 --width 160`` as a smoke test.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from run_info import REPO, commit, utc_stamp
from transformers.video_utils import VideoMetadata
from vitcache.client import Video, VitCacheClient
from vitcache.server.background import BackgroundServer

from vitcache.cache.l1 import L1Cache
from vitcache.config import VitcacheConfig
from vitcache.models.loading import TINY_RANDOM, _tiny_random_checkpoint
from vitcache.models.registry import FAMILIES
from vitcache.models.video import load_video_processor


def make_clip(seconds: float, height: int, width: int, fps: int) -> bytes:
    """A moving smooth pattern (compresses like camera footage more than noise does)."""
    out = io.BytesIO()
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    with av.open(out, mode="w", format="mp4") as file:
        stream = file.add_stream("libx264", rate=fps)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        for i in range(round(seconds * fps)):
            phase = i / fps
            rgb = np.stack([np.sin(x / 40 + phase), np.cos(y / 30 - phase), np.sin((x + y) / 50 + 2 * phase)], -1)
            frame = av.VideoFrame.from_ndarray(((rgb + 1) * 127.5).astype(np.uint8), format="rgb24")
            file.mux(stream.encode(frame))
        file.mux(stream.encode())
    return out.getvalue()


def timed(fn, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def transformers_path(model_dir: str, clip: bytes, fps: float, device: str, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = load_video_processor(model_dir, FAMILIES["qwen2_5_vl"])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to(device).eval()

    def run() -> None:
        with av.open(io.BytesIO(clip)) as file:
            stream = file.streams.video[0]
            frames = np.stack([f.to_ndarray(format="rgb24") for f in file.decode(stream)])
            rate = float(Fraction(stream.average_rate))
        metadata = VideoMetadata(total_num_frames=len(frames), fps=rate, height=frames.shape[1], width=frames.shape[2])
        inputs = processor(
            videos=[torch.from_numpy(frames).permute(0, 3, 1, 2)],
            video_metadata=[metadata],
            do_sample_frames=True,
            fps=fps,
            device=device,
            return_tensors="pt",
        )
        with torch.inference_mode():
            features = model.get_video_features(inputs["pixel_values_videos"].to(device), inputs["video_grid_thw"])
            features.pooler_output[0].cpu()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", required=True, help="a Qwen2.5-VL checkpoint directory, tiny-random, or 7b-vision-random"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--source-fps", type=int, default=30)
    parser.add_argument("--fps", type=float, default=2.0, help="frames sampled per second")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.model == "7b-vision-random":
        from miss_path import build_checkpoint  # bench/ is this script's directory

        model_dir = str(build_checkpoint(Path(tempfile.mkdtemp(prefix="vitcache-video-bench-")) / "ckpt"))
    else:
        model_dir = str(_tiny_random_checkpoint()) if args.model == TINY_RANDOM else args.model
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32

    clip = make_clip(args.seconds, args.height, args.width, args.source_fps)
    baseline = timed(transformers_path(model_dir, clip, args.fps, args.device, dtype), args.repeats)
    server = BackgroundServer(VitcacheConfig.of(model=model_dir, device=args.device, port=0, metrics_port=0))
    try:
        with VitCacheClient(server.target) as client:
            video = Video(clip, fps=args.fps)

            def miss() -> None:
                server.engine.l1 = L1Cache(server.engine.l1.capacity_bytes)  # an empty L1: a miss again
                client.encode([video], hash_first=False)[0].raise_for_error()

            def hit() -> None:
                assert client.encode([video])[0].raise_for_error().source == "L1"

            service = timed(miss, args.repeats)
            hits = timed(hit, args.repeats * 4)
            result = client.encode([video])[0]
    finally:
        server.stop()

    report = {
        "benchmark": "video_path",
        "commit": commit(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "model": args.model,
        "clip": {
            "seconds": args.seconds,
            "height": args.height,
            "width": args.width,
            "fps": args.source_fps,
            "bytes": len(clip),
        },
        "sampling_fps": args.fps,
        "grid_thw": list(result.grid_thw),
        "tokens": int(result.embeddings[0].shape[0]),
        "transformers_s": {"median": statistics.median(baseline), "runs": baseline},
        "service_miss_s": {"median": statistics.median(service), "runs": service},
        "service_hit_s": {"median": statistics.median(hits), "runs": hits},
        "miss_speedup": statistics.median(baseline) / statistics.median(service),
    }
    out = REPO / "bench" / "results" / f"video_path-{utc_stamp()}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("grid_thw", "tokens", "miss_speedup")}), "->", out)


if __name__ == "__main__":
    main()
