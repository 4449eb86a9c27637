"""The EPD proxy helper: chat requests' images encoded by vitcache, vLLM receives image_embeds references
(grid + uuid = digest), as vLLM's own disagg_epd_proxy.py sends them; a local HTTP server stands for vLLM."""

import base64
import io
import json
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import numpy as np
import pytest
from vitcache.client import Video, VitCacheClient
from vitcache.integrations.vllm_proxy import make_proxy, rewrite_chat_request

from tests.conftest import png_bytes
from tests.test_video import clip_frames, encode_clip
from vitcache.config import VitcacheConfig


class RecordingOpenAI(BaseHTTPRequestHandler):
    """Records each body it receives and answers like vLLM's OpenAI server would (a fixed completion)."""

    received: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        self.received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        answer = json.dumps({"choices": [{"message": {"content": "a cat"}}]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args) -> None:
        pass


def serve(server: ThreadingHTTPServer) -> str:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def vllm_stand_in() -> Iterator[str]:
    RecordingOpenAI.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingOpenAI)
    yield serve(server)
    server.shutdown()


def chat(image: bytes) -> dict:
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": data_url}},
        {"type": "image_url", "image_url": {"url": "https://example.invalid/remote.png"}},
    ]
    return {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 4}


def test_proxy_sends_vllm_the_digest_and_grid_of_each_image(start_server_thread, encoder, vllm_stand_in) -> None:
    server = start_server_thread(VitcacheConfig.of(), encoder)
    image = png_bytes(64, 40, seed=5)
    with VitCacheClient(server.target) as client:
        proxy = make_proxy(vllm_stand_in, client)
        url = serve(proxy)
        try:
            request = urllib.request.Request(
                url + "/v1/chat/completions", json.dumps(chat(image)).encode(), {"content-type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                assert json.load(response)["choices"][0]["message"]["content"] == "a cat"
        finally:
            proxy.shutdown()
        expected = client.fetch([client.encode([image])[0].digest])[0].raise_for_error()
    (sent,) = RecordingOpenAI.received
    text, embeds, remote = sent["messages"][0]["content"]
    assert text == {"type": "text", "text": "what is this?"}
    assert embeds == {
        "type": "image_embeds",
        "image_embeds": {"image_grid_thw": list(expected.grid_thw)},
        "uuid": expected.digest.hex(),
    }
    assert remote == chat(image)["messages"][0]["content"][2]  # vLLM fetches a remote URL itself
    assert sent["max_tokens"] == 4


def test_a_request_without_data_urls_is_unchanged(start_server_thread, encoder) -> None:
    server = start_server_thread(VitcacheConfig.of(), encoder)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    with VitCacheClient(server.target) as client:
        assert rewrite_chat_request(client, body) is body


def test_with_vitcache_down_or_a_malformed_message_vllm_gets_the_request_as_sent(
    start_server_thread, encoder, vllm_stand_in
) -> None:  # type: ignore[no-untyped-def]
    """The proxy never drops a request: what it cannot rewrite, vLLM answers (and encodes) itself."""
    server = start_server_thread(VitcacheConfig.of(), encoder)
    bodies = [{"messages": ["not a message object"]}, chat(png_bytes(32, 32, seed=6))]
    with VitCacheClient(server.target) as client:
        proxy = make_proxy(vllm_stand_in, client)
        url = serve(proxy)
        try:
            for n, body in enumerate(bodies):
                if n == 1:
                    server.stop()  # vitcache goes away under a running proxy
                request = urllib.request.Request(
                    url + "/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"}
                )
                with urllib.request.urlopen(request, timeout=60) as response:
                    assert json.load(response)["choices"][0]["message"]["content"] == "a cat"
        finally:
            proxy.shutdown()
    assert RecordingOpenAI.received == bodies


def test_a_video_part_becomes_video_embeds_with_qwen2_5_vl_s_time_step(start_server_thread, encoder) -> None:
    """vLLM takes second_per_grid_ts (not placeholder metadata) only as a tensor: a base64 .npy, not a JSON array.
    tests_vllm/test_vllm_video.py parses these parts with vLLM's own chat code, per family."""
    server = start_server_thread(VitcacheConfig.of(), encoder)
    video = encode_clip(clip_frames(6, 56, 84))  # 10 fps, every frame kept: a time step of 2/10 s, not vLLM's 1.0
    url = "data:video/mp4;base64," + base64.b64encode(video).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}]}]}
    with VitCacheClient(server.target) as client:
        (part,) = rewrite_chat_request(client, body)["messages"][0]["content"]
        (expected,) = client.encode([Video(video)])
    assert expected.raise_for_error().video is not None
    assert part["type"] == "video_embeds" and part["uuid"] == expected.digest.hex()
    fields = part["video_embeds"]
    assert fields["video_grid_thw"] == list(expected.grid_thw)
    step = np.load(io.BytesIO(base64.b64decode(fields.pop("second_per_grid_ts"))), allow_pickle=False)
    assert step.tolist() == pytest.approx([expected.video.second_per_grid_ts]) and step[0] == pytest.approx(0.2)
    assert set(fields) == {"video_grid_thw"}  # Qwen3-VL's timestamps only for Qwen3-VL
