"""Videos for the Qwen families: outputs equal transformers' own video path (its video processor and
``get_video_features``) for clips encoded here with PyAV, raw frames and caller-made pixel_values_videos;
sampling is part of the key; bounds and damaged files fail alone."""

from __future__ import annotations

import asyncio
import io
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import av
import grpc
import numpy as np
import pytest
import torch
from transformers import Qwen3VLProcessor
from transformers.video_utils import VideoMetadata
from vitcache.client import Video, VitCacheClient

from vitcache.cache.entry import CachedEmbedding, CorruptEntry
from vitcache.cache.l1 import L1Cache
from vitcache.config import BatchingConfig, ModelConfig, VitcacheConfig
from vitcache.encode.encoder_process import EncoderProcess
from vitcache.encode.pipeline import PipelineConfig
from vitcache.encode.video_decode import VideoLimits, decode_frames, probe_video
from vitcache.engine import EmbeddingEngine, EngineConfig
from vitcache.errors import ErrorCode, ImageError
from vitcache.inputs import EncodedFile, EncodedVideo, VideoSampling
from vitcache.models.loading import EncoderLoader, VisionEncoder, load_encoder
from vitcache.models.registry import FAMILIES
from vitcache.models.tiny import make_tiny_checkpoint
from vitcache.models.video import load_video_processor
from vitcache.outcomes import ImageOutcome, Source
from vitcache.wire.timing import VideoTiming

from .conftest import png_bytes

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def clip_frames(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth moving frames (a codec keeps them close to what was encoded)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3)).astype(np.float32)
    big = np.kron(base, np.ones((8, 8, 1), np.float32))
    return np.stack([np.roll(big, 2 * i, axis=1)[:height, :width] for i in range(frames)]).astype(np.uint8)


def encode_clip(frames: np.ndarray, fps: int = 10, container: str = "mp4", codec: str = "libx264") -> bytes:
    out = io.BytesIO()
    with av.open(out, mode="w", format=container) as file:
        stream = file.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                file.mux(packet)
        for packet in stream.encode():
            file.mux(packet)
    return out.getvalue()


def decode_all(data: bytes) -> tuple[np.ndarray, float]:
    """Every frame and the rate, as transformers' PyAV loader reads them."""
    with av.open(io.BytesIO(data)) as file:
        stream = file.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in file.decode(stream)]
        return np.stack(frames), float(Fraction(stream.average_rate))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("video-ckpt")
    return {family: make_tiny_checkpoint(family, root / family) for family in QWEN_FAMILIES}


@pytest.fixture(scope="module")
def encoders(checkpoints: dict[str, Path]) -> dict[str, VisionEncoder]:
    return {family: load_encoder(ModelConfig(str(path), "cpu")) for family, path in checkpoints.items()}


@pytest.fixture(scope="module")
def clip() -> bytes:
    return encode_clip(clip_frames(12, 60, 80))


def run(encoder: VisionEncoder, items: list, config: EngineConfig | None = None) -> list[ImageOutcome]:
    """The outcomes of one engine call, in input order, from a fresh engine (its own L1)."""

    async def go() -> list[ImageOutcome]:
        engine = EmbeddingEngine(
            encoder,
            L1Cache(1 << 30),
            config=config or EngineConfig(PipelineConfig(BatchingConfig(preprocess_workers=1))),
        )
        await engine.start()
        try:
            first = [o async for o in engine.encode(items)]
            second = [o async for o in engine.encode(items)]
        finally:
            await engine.stop()
        return sorted(first, key=lambda o: o.index) + sorted(second, key=lambda o: o.index)

    return asyncio.run(go())


def reference(checkpoint: Path, family: str, frames: np.ndarray, video_fps: float, **sampling) -> tuple[dict, list]:
    """transformers' video path: the family's video processor on every decoded frame (it samples),
    then the full model's ``get_video_features``."""
    processor = load_video_processor(checkpoint, FAMILIES[family])
    metadata = VideoMetadata(total_num_frames=len(frames), fps=video_fps, height=frames.shape[1], width=frames.shape[2])
    inputs = processor(
        videos=[torch.from_numpy(frames).permute(0, 3, 1, 2)],
        video_metadata=[metadata],
        return_metadata=True,
        return_tensors="pt",
        **{"do_sample_frames": True, **sampling},
    )
    model_cls = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                 "qwen3_vl": "Qwen3VLForConditionalGeneration"}[family]  # fmt: skip
    import transformers

    model = getattr(transformers, model_cls).from_pretrained(checkpoint).eval()
    with torch.inference_mode():
        features = model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    outputs = [features.pooler_output[0]]
    outputs += [level[0] for level in getattr(features, "deepstack_features", None) or ()]
    return inputs, outputs


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_encoded_video_equals_transformers_video_path(family, checkpoints, encoders, clip):
    frames, fps = decode_all(clip)
    inputs, expected = reference(checkpoints[family], family, frames, fps, fps=4)
    outcomes = run(encoders[family], [EncodedVideo(clip, VideoSampling(fps=4))])
    computed, hit = outcomes
    assert computed.error is None, computed.error
    assert (computed.source, hit.source) == (Source.COMPUTED, Source.L1)
    entry = computed.entry
    assert list(entry.grid_thw) == inputs["video_grid_thw"][0].tolist()
    got = entry.tensors()
    assert len(got) == len(expected) == len(encoders[family].output_names)
    for tensor, want in zip(got, expected, strict=True):
        torch.testing.assert_close(tensor, want, rtol=1e-4, atol=1e-4)
    # The timing fields, as the families' processors derive them from the sampled frames.
    metadata = inputs["video_metadata"][0]
    indices = [int(i) for i in metadata.frames_indices]
    temporal = encoders[family].preprocess_config.temporal_patch_size
    assert entry.video.frames == len(indices)
    assert entry.video.second_per_grid_ts == pytest.approx(temporal / metadata.sampled_fps)
    want_stamps = Qwen3VLProcessor._calculate_timestamps(None, indices, fps, temporal)
    assert list(entry.video.timestamps) == pytest.approx(want_stamps)
    assert len(entry.video.timestamps) == entry.grid_thw[0]


# --- through a real gRPC server and Redis -------------------------------------------------------------


def server_config(**settings) -> VitcacheConfig:  # type: ignore[no-untyped-def]
    return VitcacheConfig.of(**settings)


def same_tensors(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.numpy().tobytes() == y.numpy().tobytes() for x, y in zip(a, b, strict=True))


def test_videos_through_grpc_l1_and_redis(start_server_thread, checkpoints, encoders, clip, redis_server):
    """Qwen3-VL (deepstack, timestamps): a file at two samplings, raw frames and an image in one request,
    hash-first; then a second server finds the videos in Redis with their timing."""
    frames, fps = decode_all(clip)
    raw, seconds = frames[:5], [i / fps for i in range(5)]
    items = [Video(clip, fps=8), Video(clip, fps=2), Video(raw, timestamps=seconds), png_bytes(56, 56, 1)]
    first = start_server_thread(server_config(redis_url=redis_server.url), encoders["qwen3_vl"])
    with VitCacheClient(first.target) as client:
        computed = [r.raise_for_error() for r in client.encode(items)]
        hits = [r.raise_for_error() for r in client.encode(items)]
    first.call(first.engine.drain())
    assert [r.source for r in computed] == ["COMPUTED"] * 4 and [r.source for r in hits] == ["L1"] * 4
    at8, at2, from_frames, image = computed
    assert len({at8.digest, at2.digest, from_frames.digest}) == 3  # sampling is part of the key
    assert at8.video.frames > at2.video.frames and image.video is None and all(r.cached for r in computed)

    _, want8 = reference(checkpoints["qwen3_vl"], "qwen3_vl", frames, fps, fps=8)
    for got, want in zip(at8.embeddings, want8, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    inputs, want_raw = reference(checkpoints["qwen3_vl"], "qwen3_vl", raw, fps, do_sample_frames=False)
    assert list(from_frames.grid_thw) == inputs["video_grid_thw"][0].tolist()
    for got, want in zip(from_frames.embeddings, want_raw, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert list(from_frames.video.timestamps) == pytest.approx(
        Qwen3VLProcessor._calculate_timestamps(None, list(range(5)), fps, 2)
    )

    t, h, w = at8.grid_thw
    merge = encoders["qwen3_vl"].merge_size
    groups = at8.temporal_groups()
    assert [tuple(g.shape) for g in groups] == [(t, h * w // merge**2, 32)] * 3  # merged + 2 deepstack levels
    assert torch.equal(groups[0][1], at8.embeddings[0][h * w // merge**2 : 2 * h * w // merge**2])

    second = start_server_thread(server_config(redis_url=redis_server.url), encoders["qwen3_vl"])
    with VitCacheClient(second.target) as client:
        fetched = client.fetch([r.digest for r in computed])
    assert [r.source for r in fetched] == ["L2"] * 4
    for got, want in zip(fetched, computed, strict=True):
        assert got.video == want.video and got.grid_thw == want.grid_thw
        assert same_tensors(got.embeddings, want.embeddings)


def test_caller_made_pixel_values_videos_equal_get_video_features(start_server_thread, checkpoints, encoders, clip):
    frames, fps = decode_all(clip)
    inputs, expected = reference(checkpoints["qwen2_5_vl"], "qwen2_5_vl", frames, fps, num_frames=6)
    server = start_server_thread(server_config(), encoders["qwen2_5_vl"])
    with VitCacheClient(server.target) as client:
        result = client.encode_pixels(inputs["pixel_values_videos"], inputs["video_grid_thw"])[0].raise_for_error()
        from_file = client.encode([Video(clip, num_frames=6)])[0].raise_for_error()
    assert list(result.grid_thw) == inputs["video_grid_thw"][0].tolist() == list(from_file.grid_thw)
    torch.testing.assert_close(result.embeddings[0], expected[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(from_file.embeddings[0], expected[0], rtol=1e-4, atol=1e-4)
    assert from_file.video.second_per_grid_ts == pytest.approx(2 / inputs["video_metadata"][0].sampled_fps)


def test_video_over_the_cached_bound_is_returned_not_cached(start_server_thread, encoders, clip, redis_server):
    server = start_server_thread(
        server_config(redis_url=redis_server.url, max_cached_video_bytes=1024), encoders["qwen2_vl"]
    )
    image = png_bytes(56, 56, 2)
    with VitCacheClient(server.target) as client:
        first = [r.raise_for_error() for r in client.encode([Video(clip), image])]
        again = [r.raise_for_error() for r in client.encode([Video(clip), image])]
    server.call(server.engine.drain())
    assert first[0].embeddings[0].numel() * 4 > 1024
    assert (first[0].source, first[0].cached, again[0].source, again[0].cached) == (
        "COMPUTED",
        False,
        "COMPUTED",
        False,
    )
    assert (first[1].cached, again[1].source) == (True, "L1")  # images are not bound by it
    assert len(redis_server.client().keys("vitcache:v1:*")) == 1  # the image alone
    assert redis_server.client().keys("*:lock") == []  # the fleet lock of the unstored video was released
    assert same_tensors(first[0].embeddings, again[0].embeddings)


# --- bounds and bad input -----------------------------------------------------------------------------


def faststart_clip(frames: np.ndarray, path: Path) -> bytes:
    """An MP4 with its index first (written to ``path``: moving it there reads the file back): cut
    short, its header still promises every frame."""
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "faststart"}) as file:
        stream = file.add_stream("libx264", rate=10)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            file.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        file.mux(stream.encode())
    return path.read_bytes()


def test_bad_and_oversized_videos_fail_alone(start_server_thread, encoders, clip, tmp_path):
    limits = {"max_video_seconds": 2.0, "max_video_frames": 8, "max_video_frame_pixels": 100 * 100}
    server = start_server_thread(server_config(**limits), encoders["qwen2_vl"])
    rng = np.random.default_rng(5)
    truncated = faststart_clip(clip_frames(12, 60, 80, seed=3), tmp_path / "faststart.mp4")
    frames = clip_frames(4, 60, 80)
    bad = {
        "random bytes": (Video(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()), "not a decodable video"),
        "an image": (Video(png_bytes(64, 64, 3)), "not a decodable video"),
        "truncated": (Video(truncated[: len(truncated) * 2 // 3], num_frames=6), "truncated or damaged"),
        "too many frames": (Video(clip), "12 frames sampled is over the limit of 8"),
        "too long": (Video(encode_clip(clip_frames(30, 60, 80))), "over the limit of 2.0 s"),
        "frames too large": (Video(encode_clip(clip_frames(2, 128, 128))), "over the limit of 10000"),
        "both fps and num_frames": (Video(clip, fps=2, num_frames=4), "set fps or num_frames, not both"),
        "timestamps descending": (Video(frames, timestamps=[3, 2, 1, 0]), "ascending"),
        "fps for raw frames": (Video(frames, timestamps=[0, 1, 2, 3], fps=2), "sampled already"),
    }
    good = [Video(clip, num_frames=4), png_bytes(56, 56, 4), Video(frames, timestamps=[0, 0.5, 1, 1.5])]
    with VitCacheClient(server.target) as client:
        results = client.encode([item for item, _ in bad.values()] + good)
        stats = client.stats()
    for (what, (_, message)), result in zip(bad.items(), results, strict=False):
        assert result.error is not None, what
        assert result.error.code is grpc.StatusCode.INVALID_ARGUMENT, (what, result.error)
        assert message in result.error.message, (what, result.error.message)
    assert all(r.ok and r.source == "COMPUTED" for r in results[len(bad) :])
    assert stats.l1_entries == len(good)  # nothing cached for the bad ones


def test_video_over_the_decoded_pixel_budget_waits_or_fails(start_server_thread, encoders, clip):
    """Sampled frames take width x height each from --max-decoded-pixels-in-flight before decoding."""
    server = start_server_thread(server_config(max_decoded_pixels_in_flight=8 * 60 * 80), encoders["qwen2_vl"])
    with VitCacheClient(server.target) as client:
        whole, sampled = client.encode([Video(clip), Video(clip, num_frames=8)])
    assert whole.error is not None and whole.error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "decoded pixel budget" in whole.error.message
    assert sampled.ok and sampled.video.frames == 8


def test_small_frames_count_as_what_they_are_scaled_up_to(start_server_thread, encoders):
    """2 frames of 16x16 scaled up to min_pixels=40000 take 80000 pixels of the budget, not 512."""
    tiny = encode_clip(clip_frames(2, 16, 16))
    config = server_config(max_decoded_pixels_in_flight=60_000, max_video_frame_pixels=50_000)
    server = start_server_thread(config, encoders["qwen2_vl"])
    with VitCacheClient(server.target) as client:
        upscaled, over_bound, default = client.encode(
            [Video(tiny, min_pixels=40_000, max_pixels=50_000), Video(tiny, min_pixels=60_000), Video(tiny)]
        )
    assert upscaled.error is not None and upscaled.error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert over_bound.error is not None and over_bound.error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "--max-video-frame-pixels" in over_bound.error.message
    assert default.ok  # the tiny checkpoint's min_pixels (3136) per frame fits


def test_video_hit_over_shared_memory_keeps_its_timing(start_server_thread, encoders, clip, tmp_path):
    socket_path = tmp_path / "shm" / "shm.sock"
    server = start_server_thread(VitcacheConfig.of(shm_socket=str(socket_path)), encoders["qwen2_5_vl"])
    with VitCacheClient(server.target, shm_socket=socket_path) as client:
        computed = client.encode([Video(clip, fps=4)])[0].raise_for_error()
        hit = client.encode([Video(clip, fps=4)])[0].raise_for_error()
    assert (computed.source, hit.source) == ("COMPUTED", "L1")
    assert hit.video == computed.video and hit.video.second_per_grid_ts > 0
    assert same_tensors(hit.embeddings, computed.embeddings)


@pytest.mark.parametrize(("container", "codec"), [("webm", "libvpx-vp9"), ("matroska", "libx264")])
def test_webm_and_mkv_files_equal_transformers(container, codec, checkpoints, encoders):
    """Matroska containers store no frame count: the packets are counted from the index."""
    data = encode_clip(clip_frames(8, 60, 80, seed=7), container=container, codec=codec)
    frames, fps = decode_all(data)
    inputs, expected = reference(checkpoints["qwen2_vl"], "qwen2_vl", frames, fps, fps=5)
    outcome = run(encoders["qwen2_vl"], [EncodedVideo(data, VideoSampling(fps=5))])[0]
    assert outcome.error is None, outcome.error
    assert list(outcome.entry.grid_thw) == inputs["video_grid_thw"][0].tolist()
    torch.testing.assert_close(outcome.entry.tensors()[0], expected[0], rtol=1e-4, atol=1e-4)


def test_video_timing_crosses_the_encoder_process(checkpoints, encoders, clip):
    """The child writes the tokens into the shared ring; the timing travels with the reply."""
    video = [EncodedVideo(clip, VideoSampling(fps=4))]
    child = run(EncoderProcess(EncoderLoader(ModelConfig(str(checkpoints["qwen3_vl"])))), video)[0]
    here = run(encoders["qwen3_vl"], video)[0]
    assert child.error is None, child.error
    assert child.entry.video == here.entry.video and child.entry.video is not None
    for a, b in zip(child.entry.tensors(), here.entry.tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_stored_video_timing_is_checksummed():
    timing = VideoTiming(4, 2.0, 1.0, (0.25, 1.25))
    entry = CachedEmbedding.from_tensors((2, 2, 2), [torch.ones(2, 4)])
    value = replace(entry, video=timing).to_value()
    assert CachedEmbedding.from_value(value).video == timing
    assert CachedEmbedding.from_value(entry.to_value()).video is None
    with pytest.raises(CorruptEntry, match="checksum"):
        CachedEmbedding.from_value(value.replace(b"1.25", b"9.25"))


def test_kimi_video_items_fail_alone(tmp_path, clip):
    """transformers 5.23's Kimi-K2.5 video path does not run (get_video_features splits the tower's pooled
    output by t*h*w/4 tokens per chunk, not h*w/4), so there is nothing to match: videos are refused."""
    kimi = load_encoder(ModelConfig(str(make_tiny_checkpoint("kimi_k25", tmp_path / "kimi")), "cpu"))
    video, image = run(kimi, [EncodedVideo(clip), EncodedFile(png_bytes(56, 56, 6))])[:2]
    assert video.error is not None and video.error.code is ErrorCode.INVALID_ARGUMENT
    assert "has no video path" in video.error.message
    assert image.error is None and image.source is Source.COMPUTED


def test_decoding_stops_at_the_deadline(clip):
    """The deadline is checked before each decoded frame, not only before decoding starts."""
    header = probe_video(clip, VideoLimits())
    checked = []

    def check_deadline() -> None:
        checked.append(1)
        if len(checked) == 3:
            raise ImageError(ErrorCode.DEADLINE_EXCEEDED, "deadline passed")

    with pytest.raises(ImageError, match="deadline passed"):
        decode_frames(clip, header, [0, 11], check_deadline)
    assert len(checked) == 3
    assert decode_frames(clip, header, [0, 5, 5, 11], lambda: None).shape == (4, 60, 80, 3)
