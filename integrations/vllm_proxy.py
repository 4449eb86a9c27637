"""vLLM's EPD flow through vitcache: images are encoded by vitcache, vLLM receives only their grid and digest.

:func:`rewrite_chat_request` does to an OpenAI chat request what vLLM's own proxy
(examples/disaggregated/disaggregated_encoder/disagg_epd_proxy.py, ``rewrite_for_decode``) does after its encoder
instance ran: each image part becomes ``{"type": "image_embeds", "image_embeds": {"image_grid_thw": [t, h, w]},
"uuid": <digest hex>}``. A vLLM consumer with ``VitcacheECConnector`` then loads the embedding vitcache computed
(the uuid is the identifier, a digest). ``vitcache proxy`` serves it in front of a vLLM server. No vLLM import.
"""

from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from vitcache.client import VitCacheClient

logger = logging.getLogger(__name__)

# Families whose vLLM model takes precomputed image input as image_embeds + image_grid_thw.
GRID_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


def _image_bytes(part: dict[str, Any]) -> bytes | None:
    """The bytes of an ``image_url`` part given as a data URL; None for a URL vLLM has to fetch itself."""
    url = (part.get("image_url") or {}).get("url", "")
    if not url.startswith("data:") or ";base64," not in url:
        return None
    return base64.b64decode(url.split(";base64,", 1)[1], validate=True)


def rewrite_chat_request(client: VitCacheClient, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """``body`` with every data-URL image part encoded through vitcache (hash-first) and replaced by its
    ``image_embeds`` reference; parts vitcache could not encode (and remote URLs) are left for vLLM."""
    parts = [
        part
        for message in body.get("messages", [])
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if part.get("type") == "image_url"
    ]
    images = {id(part): data for part in parts if (data := _image_bytes(part)) is not None}
    if not images:
        return body
    results = dict(zip(images, client.encode(list(images.values()), timeout=timeout), strict=True))
    rewritten = 0

    def rewrite(part: dict[str, Any]) -> dict[str, Any]:
        nonlocal rewritten
        result = results.get(id(part))
        if result is None or not result.ok:
            return part
        rewritten += 1
        grid = [int(v) for v in result.grid_thw]
        return {"type": "image_embeds", "image_embeds": {"image_grid_thw": grid}, "uuid": result.digest.hex()}

    messages = [
        {**message, "content": [rewrite(part) for part in message["content"]]}
        if isinstance(message.get("content"), list)
        else message
        for message in body.get("messages", [])
    ]
    logger.debug("rewrote %d of %d image parts", rewritten, len(parts))
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
                    body = json.dumps(rewrite_chat_request(client, json.loads(body))).encode()
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
