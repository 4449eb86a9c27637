"""Videos through vLLM 0.33.0: the connector loads a video entry vitcache computed, with the placeholder vLLM's own
Qwen processors give the video, and the EPD proxy's ``video_embeds`` parts parse with vLLM's own chat code into what
those processors need (grid, Qwen3-VL's timestamps, Qwen2.5-VL's second_per_grid_ts). Tiny checkpoints of the three
Qwen families, one real vitcache server each.

vLLM's Qwen processors import torchvision (transformers' Qwen2-VL image processor): .venv-vllm has torchvision's CUDA
wheel without its compiled ops (scripts/torchvision_without_ops.py), which those processors do not use.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ROOT, RunningServer, start_server
from test_vllm_connector import connector, load
from vitcache.client import EncodedImage, Video, VitCacheClient
from vitcache.integrations.vllm_proxy import rewrite_chat_request, video_embeds
from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorRole
from vllm.multimodal.inputs import MultiModalFeatureSpec
from vllm.sampling_params import SamplingParams
from vllm.v1.request import Request

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
MAIN_PYTHON = ROOT / ".venv" / "bin" / "python"
PROMPT = "describe <|vision_start|><|video_pad|><|vision_end|> ."
FPS = 10.0  # Qwen2.5-VL's time step 2/10 s, not the 1.0 vLLM assumes when second_per_grid_ts is missing
# 5 frames: three temporal groups, the last padded with a copy of the last frame.
FRAMES = np.random.default_rng(7).integers(0, 256, (5, 60, 90, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny checkpoints with the word-level tokenizer of the SGLang tests, written in the main venv."""
    root = tmp_path_factory.mktemp("checkpoints")
    script = (
        "import sys; from vitcache.models.tiny import make_tiny_checkpoint; "
        "from tests.sglang.conftest import tiny_tokenizer\n"
        "for family in sys.argv[2:]:\n"
        "    tiny_tokenizer().save_pretrained(make_tiny_checkpoint(family, sys.argv[1] + family))"
    )
    subprocess.run([str(MAIN_PYTHON), "-c", script, f"{root}/", *FAMILIES], check=True, cwd=ROOT, capture_output=True)
    return {family: root / family for family in FAMILIES}


@pytest.fixture(scope="module")
def servers(checkpoints: dict[str, Path]) -> Iterator[dict[str, RunningServer]]:
    running: dict[str, RunningServer] = {}
    try:
        for family, path in checkpoints.items():
            running[family] = start_server("--model", str(path))
        yield running
    finally:
        for server in running.values():
            server.stop()


def vllm_processor(checkpoint: Path) -> Any:
    """vLLM's multimodal processor for the checkpoint, configured as on an EC consumer (embeddings arrive through
    the connector, so a request may carry only their metadata)."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    model_config = ModelConfig(model=str(checkpoint), tokenizer=str(checkpoint), enable_mm_embeds=True)
    model_config.multimodal_config.allow_missing_mm_embeddings = True  # what VllmConfig sets for an ec_consumer
    return MULTIMODAL_REGISTRY.create_processor(model_config)


def process(processor: Any, video: Any, uuid: str | None = None) -> Any:
    uuids = {"video": [uuid]} if uuid else None
    return processor(PROMPT, processor.info.parse_mm_data({"video": video}), uuids, hf_processor_mm_kwargs={})


def parse_chat(parts: list[dict[str, Any]], processor: Any) -> dict[str, Any]:
    """The multimodal data vLLM's chat parsing makes of a user message with ``parts``."""
    from vllm.renderers.chat_utils.chat_message import parse_chat_messages

    messages = [{"role": "user", "content": parts}]
    _, mm_data, _ = parse_chat_messages(messages, processor.info.ctx.model_config, "openai")
    return mm_data


def mrope_positions(family: str, processor: Any, prompt: list[int], feature: MultiModalFeatureSpec) -> Any:
    """vLLM's M-RoPE positions of the prompt, by its model class's own code (which reads only the HF config)."""
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
    from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration
    from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

    model_cls = {
        "qwen2_vl": Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": Qwen3VLForConditionalGeneration,
    }[family]
    config = processor.info.get_hf_config()
    if family == "qwen3_vl":  # a static method of the config
        return model_cls._get_mrope_input_positions(prompt, [feature], config)
    model = SimpleNamespace(config=config)
    model.iter_mm_grid_thw = partial(model_cls.iter_mm_grid_thw, model)
    return model_cls.get_mrope_input_positions(model, prompt, [feature])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_video_entry_loads_with_the_placeholder_vllm_gives_the_video(family, checkpoints, servers) -> None:
    target = servers[family].target
    with VitCacheClient(target) as client:
        (result,) = client.encode([Video(FRAMES, timestamps=[n / FPS for n in range(len(FRAMES))])])
    result.raise_for_error()
    processor = vllm_processor(checkpoints[family])
    # vLLM processing the frames itself (as its video loader hands them on, with their rate)
    metadata = {
        "fps": FPS,
        "total_num_frames": len(FRAMES),
        "frames_indices": list(range(len(FRAMES))),
        "duration": len(FRAMES) / FPS,
        "video_backend": "opencv",
        "do_sample_frames": False,
    }
    from_frames = process(processor, [(FRAMES, metadata)])
    # ... and a request that carries only what the proxy sends for the entry (no pixels, no embeddings), through
    # vLLM's chat parsing
    part = {"type": "video_embeds", "video_embeds": video_embeds(result, family), "uuid": result.digest.hex()}
    from_entry = process(processor, parse_chat([part], processor)["video"], result.digest.hex())

    prompt = from_entry["prompt_token_ids"]
    assert prompt == from_frames["prompt_token_ids"]
    (placeholder,) = from_entry["mm_placeholders"]["video"]
    assert placeholder == from_frames["mm_placeholders"]["video"][0]
    feature, reference = (
        MultiModalFeatureSpec(out["mm_kwargs"]["video"][0], "video", result.digest.hex(), placeholder)
        for out in (from_entry, from_frames)
    )
    # the same M-RoPE positions (Qwen2.5-VL: time steps from second_per_grid_ts) as for the frames
    positions, delta = mrope_positions(family, processor, prompt, feature)
    expected_positions, expected_delta = mrope_positions(family, processor, prompt, reference)
    assert torch.equal(torch.as_tensor(positions), torch.as_tensor(expected_positions)) and delta == expected_delta
    request = Request("video", prompt, SamplingParams(max_tokens=1), None, mm_features=[feature])
    assert request.get_num_encoder_embeds(0) == result.embeddings[0].shape[0]  # t*h*w/merge² (Qwen3-VL: of 30)

    scheduler = connector("ec_consumer", ECConnectorRole.SCHEDULER, target)
    worker = connector("ec_consumer", ECConnectorRole.WORKER, target)
    loaded = load(worker, scheduler, request)[result.digest.hex()]
    # vLLM's _process_video_input layout: the merged tokens, Qwen3-VL's deepstack features after them on dim 1
    assert torch.equal(loaded, torch.cat(result.embeddings, dim=1))


def clip_mp4() -> bytes:
    """An 8-frame 10 fps MP4, encoded with PyAV in the main venv (the test suite's own helper)."""
    script = (
        "import sys; from tests.test_video import clip_frames, encode_clip; "
        "sys.stdout.buffer.write(encode_clip(clip_frames(8, 56, 84, seed=3)))"
    )
    return subprocess.run([str(MAIN_PYTHON), "-c", script], check=True, cwd=ROOT, capture_output=True).stdout


def chat(video: bytes) -> dict[str, Any]:
    url = "data:video/mp4;base64," + base64.b64encode(video).decode()
    content = [{"type": "text", "text": "describe"}, {"type": "video_url", "video_url": {"url": url}}]
    return {"model": "m", "messages": [{"role": "user", "content": content}]}


def expected_timing(result: EncodedImage, family: str, item: Any) -> None:
    """The request's video item carries the timing that places the entry's tokens as vitcache computed them."""
    assert result.video is not None
    if family == "qwen2_5_vl":  # M-RoPE's time step
        assert item["second_per_grid_ts"].data.item() == pytest.approx(result.video.second_per_grid_ts)
        assert result.video.second_per_grid_ts != 1.0  # vLLM's default when it is missing: this test would see it
    if family == "qwen3_vl":  # the prompt's "<t seconds>" text
        assert torch.as_tensor(item["timestamps"].data).tolist() == pytest.approx(list(result.video.timestamps))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_proxy_s_video_embeds_part_parses_with_vllm_s_chat_code(family, checkpoints, servers) -> None:
    from vllm.renderers.chat_utils.chat_message import parse_chat_messages

    video = clip_mp4()
    with VitCacheClient(servers[family].target) as client:
        rewritten = rewrite_chat_request(client, chat(video))
        (result,) = client.encode([Video(video)])
    result.raise_for_error()
    (part,) = [p for p in rewritten["messages"][0]["content"] if p["type"] != "text"]
    assert part["type"] == "video_embeds" and part["uuid"] == result.digest.hex()

    processor = vllm_processor(checkpoints[family])
    conversation, mm_data, mm_uuids = parse_chat_messages(
        rewritten["messages"], processor.info.ctx.model_config, "openai"
    )
    assert conversation[0]["content"] == [{"type": "text", "text": "describe"}, {"type": "video"}]
    assert mm_uuids == {"video": [result.digest.hex()]}
    processed = process(processor, mm_data["video"], result.digest.hex())
    (placeholder,) = processed["mm_placeholders"]["video"]
    assert placeholder.get_num_embeds() == result.embeddings[0].shape[0]
    item = processed["mm_kwargs"]["video"][0]
    assert item["video_grid_thw"].data.tolist() == list(result.grid_thw)
    expected_timing(result, family, item)
