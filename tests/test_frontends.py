"""--frontends: several gRPC processes on one port in front of one engine (one L1, one set of encoders)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from vitcache.client import ConnectOptions, VitCacheClient
from vitcache.server.background import BackgroundServer
from vitcache.server.frontends.link import frame
from vitcache.server.frontends.supervisor import FrontendLink, FrontendProcesses
from vitcache.server.metrics import ServerMetrics
from vitcache.v1 import vitcache_pb2 as pb
from vitcache.v1 import vitcache_pb2_grpc as pb_grpc

from vitcache.config import VitcacheConfig
from vitcache.digest import digest_file

from .conftest import free_port, http_get, png_bytes, server_thread

TOKEN = "frontends-test-token"


def _until(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def fronted(encoder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:  # type: ignore[no-untyped-def]
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    config = VitcacheConfig.of(frontends=2, auth_token_file=str(tokens), metrics_port=free_port())
    server = server_thread(config, encoder)
    yield server
    server.stop()


def _client(server: BackgroundServer) -> VitCacheClient:
    return VitCacheClient(server.target, options=ConnectOptions(auth_token=TOKEN))


def test_frontends_share_one_l1_and_fail_bad_images_alone(fronted: BackgroundServer) -> None:
    image = png_bytes(56, 56, 7)
    with _client(fronted) as client:
        first, junk = client.encode([image, b"not an image"])
    assert first.source == "COMPUTED" and junk.error is not None and junk.error.code == grpc.StatusCode.INVALID_ARGUMENT
    link = fronted.running.frontends.link  # type: ignore[union-attr]
    hits = 0
    # New connections until the kernel has given some to each front-end (each is a coin toss).
    while not all(peer.calls_served for peer in link.peers.values()) or hits < 4:
        with _client(fronted) as client:
            (again,) = client.encode([image])
        assert again.source == "L1", "every front-end reads the one L1"
        assert [t.tolist() for t in again.embeddings] == [t.tolist() for t in first.embeddings]
        hits += 1
        assert hits < 64
    assert len(link.peers) == 2
    assert link.entries_sent_inline == 0, "a computed entry, like a hit, reaches the front-end as its place in L1"
    _until(lambda: link.pinned == 0, "front-ends release the entries their replies were built from")
    with VitCacheClient(fronted.target) as anonymous, pytest.raises(grpc.RpcError) as refused:
        anonymous.encode([image])
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_frontends_answer_health_and_their_rpcs_count_in_the_engines_metrics(fronted: BackgroundServer) -> None:
    with grpc.insecure_channel(fronted.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="vitcache.v1.VitCache"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    port = fronted.running.metrics_port  # type: ignore[union-attr]

    def fetched_ok() -> float:
        _, _, body = http_get(port, "/metrics", {"Authorization": f"Bearer {TOKEN}"})
        found = re.search(rb'vitcache_requests_total\{code="OK",method="Fetch"\} ([0-9.e+]+)', body)
        return float(found.group(1)) if found else 0.0

    before = fetched_ok()
    digest = digest_file(png_bytes(56, 56, 8))
    with _client(fronted) as client:
        for _ in range(3):
            client.fetch([digest])
    _until(lambda: fetched_ok() >= before + 3, "each front-end RPC counted in the engine's /metrics")


def test_a_cancelled_stream_releases_its_entries(fronted: BackgroundServer) -> None:
    images = [png_bytes(56, 56, 100 + i) for i in range(16)]
    with _client(fronted) as client:
        client.encode(images)
    request = pb.FetchRequest(digests=[digest_file(image) for image in images])
    with grpc.insecure_channel(fronted.target) as channel:
        stream = pb_grpc.VitCacheStub(channel).Fetch(request, metadata=[("authorization", f"Bearer {TOKEN}")])
        assert next(stream).source == pb.L1
        stream.cancel()
    link = fronted.running.frontends.link  # type: ignore[union-attr]
    _until(lambda: link.pinned == 0, "a cancelled call's entries are released")


def test_a_killed_frontend_is_started_again_and_stopping_ends_them_all(encoder) -> None:  # type: ignore[no-untyped-def]
    server = server_thread(VitcacheConfig.of(frontends=2), encoder)
    frontends = server.running.frontends  # type: ignore[union-attr]
    frontends.restart_backoff_s = 0.1
    try:
        victim = frontends.pids[0]
        os.kill(victim, signal.SIGKILL)
        _until(lambda: _zombie(victim) or frontends.pids[0] != victim, "front-end 0 dead")
        image = png_bytes(56, 56, 9)
        for _ in range(8):  # new connections go to the front-end that is left (or to the new one)
            assert _encode_retrying(server.target, image).error_code == 0
        _until(lambda: frontends.restarts == 1 and frontends.pids[0] not in (None, victim), "a new front-end 0")
        _until(lambda: frontends.link.peers[0].pid == frontends.pids[0], "the new front-end on the link")
        pids = [pid for pid in frontends.pids if pid is not None]
    finally:
        server.stop()
    assert pids and all(not Path(f"/proc/{pid}").exists() or _zombie(pid) for pid in pids)


def _encode_retrying(target: str, image: bytes, tries: int = 3) -> pb.ImageResult:
    """As a gRPC client with retries would: a connection the kernel had queued on the killed front-end is
    reset, and the next one goes to a live one. Each try is a new connection: channels share their
    connections by default, and a shared one just reset fails the next call at once (it is backing off)."""
    for attempt in range(tries):
        try:
            with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                (result,) = pb_grpc.VitCacheStub(channel).Encode(pb.EncodeRequest(images=[pb.Image(encoded=image)]))
                return result
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


class _TouchOnUnpickle:
    """A pickle that creates ``marker`` when it is loaded: what a process that reached the link could send."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[Path], None], tuple[Path]]:
        return Path.touch, (self.marker,)


def test_the_link_loads_nothing_a_connection_sends_before_it_proves_the_secret(
    fronted: BackgroundServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    link = fronted.running.frontends.link  # type: ignore[union-attr]
    directory = Path(link.address.path).parent
    assert directory.stat().st_mode & 0o777 == 0o700, "no other user reaches the socket"
    marker = tmp_path / "unpickled"
    for attempt in (frame(("hello", _TouchOnUnpickle(marker), 0)), b"\xff" * 64):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(5)
            conn.connect(link.address.path)
            conn.sendall(attempt)
            assert conn.recv(1) == b"", "the engine closes a connection without the secret"
    assert not marker.exists(), "the engine unpickled what an unproven connection sent"
    _until(lambda: caplog.text.count("without the secret") == 2, "each refused connection logged in one line")
    assert "Traceback" not in caplog.text


def test_the_link_starts_when_the_temporary_directory_path_is_too_long_for_a_unix_socket(
    fronted: BackgroundServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    long_tmp = tmp_path / ("d" * 120)  # a job scheduler's $TMPDIR can be this long; sun_path holds 107 bytes
    long_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_tmp))
    link = FrontendLink(fronted.engine)
    fronted.call(link.start())
    try:
        assert Path(link.address.path).parent.stat().st_mode & 0o777 == 0o700
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(5)
            conn.connect(link.address.path)
            conn.sendall(link.address.hello(7, os.getpid()))
            assert conn.recv(8), "a front-end is welcomed"
    finally:
        fronted.call(link.stop())
    assert not Path(link.address.path).parent.exists(), "stopping removes the link's directory"


def test_front_ends_that_cannot_bind_leave_no_link_behind(fronted: BackgroundServer) -> None:
    config = VitcacheConfig.of(frontends=1, host="192.0.2.1", port=0)  # TEST-NET-1: no address of this machine
    frontends = FrontendProcesses(config, fronted.engine, ServerMetrics())
    with pytest.raises(OSError):
        fronted.call(frontends.start())
    assert not Path(frontends.link.address.path).parent.exists(), "a failed start removes the link's socket"


def _model_info_and_pixel_answers(server: BackgroundServer, token: str | None) -> tuple[pb.ModelInfo, list, str]:
    """GetModelInfo; per image, the error of a pixel batch whose first grid is fine, second not a multiple of the
    merge size and third over the frame limit; and a batch of the wrong width's error."""
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.VitCacheStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata)
        merge = info.merge_size
        too_wide = json.loads(info.preprocess_config_json)["max_pixels"] // info.patch_size**2 // merge + 1
        grids = [(1, merge, merge), (1, merge + 1, merge), (1, merge, merge * too_wide)]
        rows = sum(t * h * w for t, h, w in grids)
        batch = pb.PixelBatch(
            pixel_values=pb.Tensor(
                dtype="float32", shape=[rows, info.patch_dim], data=bytes(rows * info.patch_dim * 4)
            ),
            image_grid_thw=[v for grid in grids for v in grid],
        )
        results = list(stub.Encode(pb.EncodeRequest(pixels=batch), metadata=metadata))
        per_image = sorted((r.index, r.error_code, r.error_message) for r in results)
        batch.pixel_values.shape[:] = [rows * 2, info.patch_dim // 2]
        with pytest.raises(grpc.RpcError) as wrong_width:
            list(stub.Encode(pb.EncodeRequest(pixels=batch), metadata=metadata))
    return info, per_image, wrong_width.value.details()


def test_frontends_answer_model_info_and_pixel_batches_as_the_engine_does_without_torch(
    fronted: BackgroundServer,
    encoder,  # type: ignore[no-untyped-def]
) -> None:
    plain = server_thread(VitcacheConfig.of(), encoder)
    try:
        without = _model_info_and_pixel_answers(plain, None)
    finally:
        plain.stop()
    through = _model_info_and_pixel_answers(fronted, TOKEN)
    assert through == without
    info, per_image, _ = through
    assert info.dtype == "float32" and info.preprocess_config_json
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [code for _, code, _ in per_image] == [0, invalid, invalid]
    assert "merge size" in per_image[1][2] and "max_pixels" in per_image[2][2]
    with _client(fronted) as client:  # an engine snapshot crosses the link too
        assert client.stats().uptime_seconds > 0
    pids = [pid for pid in fronted.running.frontends.pids if pid is not None]  # type: ignore[union-attr]
    assert pids
    for pid in pids:  # having built replies of every kind above, no front-end has loaded torch
        assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text()
