"""vLLM's EPD flow through vitcache: images and videos are encoded by vitcache, vLLM receives only their grid
(videos: and timing) and digest.

:func:`rewrite_chat_request` does to an OpenAI chat request what vLLM's own proxy
(examples/disaggregated/disaggregated_encoder/disagg_epd_proxy.py, ``rewrite_for_decode``) does after its encoder
instance ran: each image part becomes ``{"type": "image_embeds", "image_embeds": {"image_grid_thw": [t, h, w]},
"uuid": <digest hex>}``, each video part ``{"type": "video_embeds", "video_embeds": {"video_grid_thw": [t, h, w],
...timing}, "uuid": <digest hex>}``. A vLLM consumer with ``VitcacheECConnector`` then loads the embedding vitcache
computed (the uuid is the identifier, a digest). ``vitcache proxy`` serves it in front of a vLLM server. No vLLM
import.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import numpy as np
from vitcache.client import EncodedImage, Video, VitCacheClient

logger = logging.getLogger(__name__)

# Families whose vLLM model takes precomputed image (video) input as image_embeds + image_grid_thw (video_...).
GRID_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


def _media(part: dict[str, Any]) -> bytes | Video | None:
    """What an ``image_url`` (the file's bytes) or ``video_url`` part (a :class:`Video`, sampled as the server's
    video processor samples by default) given as a data URL holds; None for a URL vLLM has to fetch itself."""
    kind = part.get("type")
    if kind not in ("image_url", "video_url"):
        return None
    url = (part.get(kind) or {}).get("url", "")
    if not url.startswith("data:") or ";base64," not in url:
        return None
    data = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    return Video(data) if kind == "video_url" else data


def _npy_base64(values: list[float]) -> str:
    """``values`` as vLLM's chat API takes a tensor that is not placeholder metadata: a base64 ``.npy``."""
    out = io.BytesIO()
    np.save(out, np.asarray(values, dtype=np.float32), allow_pickle=False)
    return base64.b64encode(out.getvalue()).decode()


def video_embeds(result: EncodedImage, family: str) -> dict[str, Any]:
    """The ``video_embeds`` fields vLLM 0.33.0's model of ``family`` takes for a video it does not encode: the grid,
    Qwen3-VL's per-group ``timestamps`` (its prompt's "<t seconds>" text) and Qwen2.5-VL's ``second_per_grid_ts``
    (its M-RoPE time step; not placeholder metadata, so vLLM takes it as a tensor, not a JSON array)."""
    assert result.video is not None
    fields: dict[str, Any] = {"video_grid_thw": [int(v) for v in result.grid_thw]}
    if family == "qwen3_vl":
        fields["timestamps"] = list(result.video.timestamps)
    elif family == "qwen2_5_vl":
        fields["second_per_grid_ts"] = _npy_base64([result.video.second_per_grid_ts])
    return fields


def rewrite_chat_request(
    client: VitCacheClient, body: dict[str, Any], timeout: float | None = None, family: str | None = None
) -> dict[str, Any]:
    """``body`` with every data-URL image and video part encoded through vitcache (hash-first) and replaced by its
    ``image_embeds`` / ``video_embeds`` reference; parts vitcache could not encode (and remote URLs) are left for
    vLLM. ``family``: the server's model family (asked of it when None and the request has videos)."""
    parts = [
        part
        for message in body.get("messages", [])
        if isinstance(message.get("content"), list)
        for part in message["content"]
    ]
    media = {id(part): item for part in parts if (item := _media(part)) is not None}
    if not media:
        return body
    results = dict(zip(media, client.encode(list(media.values()), timeout=timeout), strict=True))
    if family is None and any(isinstance(item, Video) for item in media.values()):
        family = client.model_info(timeout=timeout).family
    rewritten = 0

    def rewrite(part: dict[str, Any]) -> dict[str, Any]:
        nonlocal rewritten
        result = results.get(id(part))
        if result is None or not result.ok:
            return part
        rewritten += 1
        if result.video is not None:
            fields = video_embeds(result, family or "")
            return {"type": "video_embeds", "video_embeds": fields, "uuid": result.digest.hex()}
        grid = [int(v) for v in result.grid_thw]
        return {"type": "image_embeds", "image_embeds": {"image_grid_thw": grid}, "uuid": result.digest.hex()}

    messages = [
        {**message, "content": [rewrite(part) for part in message["content"]]}
        if isinstance(message.get("content"), list)
        else message
        for message in body.get("messages", [])
    ]
    logger.debug("rewrote %d of %d image and video parts", rewritten, len(media))
    return {**body, "messages": messages}


def make_proxy(vllm_url: str, client: VitCacheClient, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server that rewrites ``/v1/chat/completions`` bodies and forwards every request to ``vllm_url``
    (responses, streamed ones too, are relayed as they arrive)."""
    upstream = vllm_url.rstrip("/")
    family = client.model_info().family
    if family not in GRID_FAMILIES:
        raise ValueError(f"vitcache proxy: the server's model family {family} has no image_grid_thw input in vLLM")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._forward(None)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            if self.path.rstrip("/") == "/v1/chat/completions":
                try:
                    body = json.dumps(rewrite_chat_request(client, json.loads(body), family=family)).encode()
                # Not JSON, a bad data URL, a message of another shape, vitcache down or refusing: vLLM
                # answers the request as sent (and encodes its images itself).
                except (ValueError, TypeError, AttributeError, grpc.RpcError) as error:
                    logger.warning("vitcache proxy: forwarding a request unchanged: %s", error)
            self._forward(body)

        def _forward(self, body: bytes | None) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            request = urllib.request.Request(upstream + self.path, data=body, headers=headers, method=self.command)
            try:
                response = urllib.request.urlopen(request, timeout=600)
            except urllib.error.HTTPError as error:
                response = error
            except OSError as error:
                self.send_error(502, f"vLLM at {upstream} unreachable: {error}")
                return
            with response:
                self.send_response(response.status)
                for key, value in response.headers.items():
                    if key.lower() not in _HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("connection", "close")
                self.end_headers()
                while chunk := response.read1(64 << 10):  # what has arrived: streamed events go on at once
                    self.wfile.write(chunk)
                    self.wfile.flush()
            self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug(format, *args)

    return ThreadingHTTPServer((host, port), Handler)
