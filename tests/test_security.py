"""TLS and mutual TLS, bearer tokens, tenant isolation, Redis AUTH and keyed digests, end to end."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from vitcache.client import AsyncVitCacheClient, ConnectOptions, VitCacheClient
from vitcache.server import cli
from vitcache.server.security import Access, MetricsAccess

from vitcache.config import VitcacheConfig
from vitcache.digest import digest_file, load_digest_key

from .conftest import RedisProcess, free_port, http_get, png_bytes
from .pki import CertificateAuthority


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca = CertificateAuthority(folder, "ca"), CertificateAuthority(folder, "other-ca")
    return {
        "ca": ca,
        "server": ca.issue("server", server=True),
        "client": ca.issue("client", server=False),
        "stranger": other_ca.issue("stranger", server=False),
        "other_ca": other_ca,
    }


def _rpc_code(client: VitCacheClient) -> grpc.StatusCode | None:
    try:
        client.encode([png_bytes(56, 56, 1)], timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return None


def test_tls_and_mutual_tls(start_server_thread, encoder, pki) -> None:  # type: ignore[no-untyped-def]
    server, client_cert, stranger = pki["server"], pki["client"], pki["stranger"]
    tls = start_server_thread(VitcacheConfig.of(tls_cert=str(server.cert), tls_key=str(server.key)), encoder)
    mtls = start_server_thread(
        VitcacheConfig.of(tls_cert=str(server.cert), tls_key=str(server.key), tls_client_ca=str(pki["ca"].cert)),
        encoder,
    )
    ca = pki["ca"].cert.read_bytes()
    with_cert = ConnectOptions(tls_ca=ca, tls_cert=client_cert.cert.read_bytes(), tls_key=client_cert.key.read_bytes())
    cases = [
        (tls, ConnectOptions(tls_ca=ca), None),
        (tls, ConnectOptions(), grpc.StatusCode.UNAVAILABLE),  # plaintext to a TLS port
        (tls, ConnectOptions(tls_ca=pki["other_ca"].cert.read_bytes()), grpc.StatusCode.UNAVAILABLE),  # untrusted
        (mtls, with_cert, None),
        (mtls, ConnectOptions(tls_ca=ca), grpc.StatusCode.UNAVAILABLE),  # no client certificate
        (
            mtls,
            ConnectOptions(tls_ca=ca, tls_cert=stranger.cert.read_bytes(), tls_key=stranger.key.read_bytes()),
            grpc.StatusCode.UNAVAILABLE,  # a client certificate from another CA
        ),
    ]
    for server_thread, options, want in cases:
        with VitCacheClient(server_thread.target, options=options) as client:
            assert _rpc_code(client) == want, (server_thread.target, options.tls_cert is not None)
    assert mtls.engine.stats.misses == 1 and tls.engine.stats.misses == 1


def _token_file(folder: Path) -> Path:
    path = folder / "tokens"
    path.write_text("# token [tenant]\ngateway-token\nalice-token alice\nbob-token bob\n")
    return path


def test_bearer_tokens_guard_everything_but_health(start_server_thread, encoder, tmp_path) -> None:  # type: ignore[no-untyped-def]
    srv = start_server_thread(VitcacheConfig.of(auth_token_file=str(_token_file(tmp_path))), encoder)
    for options, want in [
        (ConnectOptions(), grpc.StatusCode.UNAUTHENTICATED),
        (ConnectOptions(auth_token="guess"), grpc.StatusCode.UNAUTHENTICATED),
        (ConnectOptions(auth_token="alice-token", tenant="bob"), grpc.StatusCode.PERMISSION_DENIED),
        (ConnectOptions(auth_token="gateway-token", tenant="no spaces"), grpc.StatusCode.INVALID_ARGUMENT),
        (ConnectOptions(auth_token="alice-token"), None),
        (ConnectOptions(auth_token="gateway-token", tenant="carol"), None),
    ]:
        with VitCacheClient(srv.target, options=options) as client:
            assert _rpc_code(client) == want, options
    channel = grpc.insecure_channel(srv.target)
    with pytest.raises(grpc.RpcError) as err:
        VitCacheClient(srv.target).stats()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reflect_v1 = channel.stream_stream(  # v1 has v1alpha's messages
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    for reflect in (reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo, reflect_v1):
        with pytest.raises(grpc.RpcError) as err:
            next(reflect(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="vitcache.v1.VitCache"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # open to load balancers
    channel.close()

    async def with_async_client() -> list:
        async with AsyncVitCacheClient(srv.target, options=ConnectOptions(auth_token="bob-token")) as client:
            return await client.encode([png_bytes(56, 56, 2)])

    assert asyncio.run(with_async_client())[0].source == "COMPUTED"
    assert srv.engine.stats.misses == 3  # only the accepted calls reached the engine


def test_metrics_port_needs_a_metrics_token_or_an_unbound_one(start_server_thread, encoder, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """/metrics and /api/stats show every tenant's numbers: with tokens on, only a --metrics-token-file token
    or an unbound (gateway) token reads them; a tenant's token is refused; the dashboard's files stay open."""
    metrics_tokens = tmp_path / "metrics-tokens"
    metrics_tokens.write_text("# prometheus\nscrape-token\n")
    tokens = _token_file(tmp_path)
    srv = start_server_thread(
        VitcacheConfig.of(auth_token_file=str(tokens), metrics_token_file=str(metrics_tokens), metrics_port=0), encoder
    )
    port = srv.running.metrics_port
    for path in ("/metrics", "/api/stats"):
        for token, want in [
            (None, 401),
            ("guess", 401),
            ("alice-token", 403),
            ("scrape-token", 200),
            ("gateway-token", 200),
        ]:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            status, _, body = http_get(port, path, headers)
            assert status == want, (path, token, body)
        assert http_get(port, path, {"Authorization": "Basic c2NyYXBlLXRva2Vu"})[0] == 401
    assert b"vitcache_images_total" in http_get(port, "/metrics", {"Authorization": "Bearer scrape-token"})[2]
    assert http_get(port, "/")[0] == 200 and http_get(port, "/dashboard.js")[0] == 200  # no numbers in them

    url = f"http://127.0.0.1:{port}"
    assert cli.main(["stats", "--metrics-url", url]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing 'authorization: Bearer <token>'" in err and "--auth-token-file" in err
    for token in ("alice-token", "scrape-token"):
        (tmp_path / token).write_text(f"{token}\n")
    assert cli.main(["stats", "--metrics-url", url, "--auth-token-file", str(tmp_path / "alice-token")]) == 1
    assert "bound to a tenant" in capsys.readouterr().err
    assert cli.main(["stats", "--metrics-url", url, "--auth-token-file", str(tmp_path / "scrape-token")]) == 0
    assert "hit ratio" in capsys.readouterr().out

    # --auth-token-file alone guards the metrics port too (its unbound tokens read it).
    guarded = start_server_thread(VitcacheConfig.of(auth_token_file=str(tokens), metrics_port=0), encoder)
    assert http_get(guarded.running.metrics_port, "/api/stats")[0] == 401
    assert http_get(guarded.running.metrics_port, "/api/stats", {"Authorization": "Bearer gateway-token"})[0] == 200
    # A metrics token file alone guards the metrics port of a server whose gRPC side is open.
    scraped = start_server_thread(VitcacheConfig.of(metrics_token_file=str(metrics_tokens), metrics_port=0), encoder)
    assert http_get(scraped.running.metrics_port, "/metrics")[0] == 401
    assert http_get(scraped.running.metrics_port, "/metrics", {"Authorization": "Bearer scrape-token"})[0] == 200


def test_metrics_token_file_takes_no_tenants(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "metrics-tokens"
    path.write_text("scrape-token alice\n")
    with pytest.raises(ValueError, match=r"metrics-tokens:1: expected one TOKEN per line"):
        MetricsAccess.build(Access.open(), path)


def test_get_stats_counts_only_the_callers_tenant_under_auth(start_server_thread, encoder, tmp_path) -> None:  # type: ignore[no-untyped-def]
    srv = start_server_thread(VitcacheConfig.of(auth_token_file=str(_token_file(tmp_path))), encoder)
    images = [png_bytes(56, 56, 40), png_bytes(56, 56, 41)]
    with VitCacheClient(srv.target, options=ConnectOptions(auth_token="alice-token")) as alice:
        assert [r.source for r in alice.encode(images)] == ["COMPUTED"] * 2  # after 2 hash-first NOT_FOUND
        assert alice.encode([b"not an image"])[0].error is not None  # NOT_FOUND, then INVALID_ARGUMENT
        alice_stats = alice.stats()
    with VitCacheClient(srv.target, options=ConnectOptions(auth_token="bob-token")) as bob:
        assert [r.source for r in bob.encode(images[:1])] == ["COMPUTED"]
        assert [r.source for r in bob.encode(images[:1])] == ["L1"]
        bob_stats = bob.stats()
    with VitCacheClient(srv.target, options=ConnectOptions(auth_token="gateway-token", tenant="carol")) as carol:
        carol_stats = carol.stats()
    assert (alice_stats.tenant_only, alice_stats.tenant) == (True, "alice")
    assert (alice_stats.misses, alice_stats.not_found, alice_stats.errors, alice_stats.l1_hits) == (2, 3, 1, 0)
    assert (bob_stats.tenant, bob_stats.misses, bob_stats.not_found, bob_stats.l1_hits) == ("bob", 1, 1, 1)
    assert (carol_stats.tenant, carol_stats.misses, carol_stats.l1_hits, carol_stats.not_found) == ("carol", 0, 0, 0)
    # Nothing server-wide: L1 fill, forwards and computed images tell of the other tenants' traffic.
    for stats in (alice_stats, bob_stats, carol_stats):
        assert stats.l1_entries == stats.l1_bytes == stats.batches == stats.images_computed == 0
        assert not stats.encoders  # per-device stats are the server's too
        assert stats.uptime_seconds > 0
    assert srv.engine.stats.misses == 3 and len(srv.engine.l1) == 3  # the server's own view is whole
    # A token bound to no tenant, naming none (an operator, a gateway's own view), sees the server whole.
    with VitCacheClient(srv.target, options=ConnectOptions(auth_token="gateway-token")) as gateway:
        whole = gateway.stats()
    assert not whole.tenant_only and (whole.misses, whole.images_computed, len(whole.encoders)) == (3, 3, 1)


def test_tenants_never_receive_each_others_entries(start_server_thread, encoder, redis_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = VitcacheConfig.of(redis_url=redis_server.url, auth_token_file=str(_token_file(tmp_path)))
    srv = start_server_thread(cfg, encoder)
    image = png_bytes(56, 84, 7)
    digest = digest_file(image)
    alice = VitCacheClient(srv.target, options=ConnectOptions(auth_token="alice-token"))
    bob = VitCacheClient(srv.target, options=ConnectOptions(auth_token="bob-token"))
    gateway = VitCacheClient(srv.target, options=ConnectOptions(auth_token="gateway-token"))
    assert alice.encode([image])[0].raise_for_error().source == "COMPUTED"
    srv.call(srv.engine.drain())
    for other in (bob, gateway):  # neither L1 nor L2 answers another tenant's digest
        (missing,) = other.fetch([digest])
        assert missing.error is not None and missing.error.code == grpc.StatusCode.NOT_FOUND
    assert bob.encode([image])[0].raise_for_error().source == "COMPUTED"
    assert alice.encode([image])[0].source == "L1"
    srv.call(srv.engine.drain())
    keys = sorted(k.decode() for k in redis_server.client().keys("vitcache:v1:*"))
    assert [k.split(":")[3] for k in keys] == ["alice", "bob"] and all(k.endswith(digest.hex()) for k in keys)
    # A second replica (empty L1) sees the same separation through L2.
    other = start_server_thread(cfg, encoder)
    with VitCacheClient(other.target, options=ConnectOptions(auth_token="alice-token")) as client:
        assert client.fetch([digest])[0].source == "L2"
    with VitCacheClient(other.target, options=ConnectOptions(auth_token="gateway-token", tenant="carol")) as client:
        assert client.fetch([digest])[0].error is not None
    for client in (alice, bob, gateway):
        client.close()


def test_redis_auth_through_the_url(start_server_thread, encoder, tmp_path) -> None:  # type: ignore[no-untyped-def]
    redis_proc = RedisProcess(tmp_path / "redis", password="s3cret-pass")
    redis_proc.start()
    try:
        wrong = start_server_thread(
            VitcacheConfig.of(redis_url=redis_proc.url.replace("s3cret-pass", "wrong"), redis_timeout_s=0.2), encoder
        )
        right = start_server_thread(VitcacheConfig.of(redis_url=redis_proc.url), encoder)
        with VitCacheClient(wrong.target) as client:
            assert client.encode([png_bytes(56, 56, 3)])[0].ok  # serves without its L2
            stats = client.stats()
        assert not stats.redis_connected and stats.l2_errors >= 1
        with VitCacheClient(right.target) as client:
            assert client.encode([png_bytes(56, 56, 4)])[0].ok
            assert client.stats().redis_connected
        right.call(right.engine.drain())
        assert redis_proc.client().dbsize() == 1  # only the authenticated replica wrote
    finally:
        redis_proc.kill()


DEBIAN_REDIS = Path("/usr/bin/redis-server")  # built with TLS; scripts/install_test_packages.sh installs it


@pytest.fixture
def tls_redis(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real redis-server that speaks TLS only, with a certificate from a throwaway CA."""
    if not DEBIAN_REDIS.exists():
        pytest.skip("no TLS-capable redis-server (Debian's redis-server package) on this machine")
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = CertificateAuthority(pki, "redis-ca")
    issued = ca.issue("redis", server=True)
    port = free_port()
    proc = subprocess.Popen(
        [
            *(str(DEBIAN_REDIS), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"),
            *("--tls-cert-file", str(issued.cert), "--tls-key-file", str(issued.key)),
            *("--tls-ca-cert-file", str(ca.cert), "--tls-auth-clients", "no", "--save", "", "--appendonly", "no"),
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(ca.cert), socket_timeout=2)
    try:
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None:
                    pytest.skip("this redis-server was built without TLS")
                time.sleep(0.05)
        else:
            raise RuntimeError("TLS redis-server did not start")
        yield port, ca.cert, client
    finally:
        proc.kill()
        proc.wait()


def test_redis_tls_through_the_url(start_server_thread, encoder, tls_redis) -> None:  # type: ignore[no-untyped-def]
    port, ca_cert, tls_client = tls_redis
    trusted = start_server_thread(
        VitcacheConfig.of(redis_url=f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca_cert}", redis_timeout_s=0.5), encoder
    )
    untrusted = start_server_thread(  # rediss:// with the system CAs: the throwaway CA is not among them
        VitcacheConfig.of(redis_url=f"rediss://127.0.0.1:{port}/0", redis_timeout_s=0.5), encoder
    )
    plaintext = start_server_thread(
        VitcacheConfig.of(redis_url=f"redis://127.0.0.1:{port}/0", redis_timeout_s=0.5), encoder
    )
    with VitCacheClient(trusted.target) as client:
        assert client.encode([png_bytes(56, 56, 21)])[0].ok
        assert client.stats().redis_connected
    trusted.call(trusted.engine.drain())
    assert tls_client.dbsize() == 1  # the entry went over TLS
    for server in (untrusted, plaintext):
        with VitCacheClient(server.target) as client:
            assert client.encode([png_bytes(56, 56, 22)])[0].ok  # serves without its L2
            stats = client.stats()
        assert not stats.redis_connected and stats.l2_errors >= 1
    assert tls_client.dbsize() == 1


def test_keyed_digests_need_the_key(start_server_thread, encoder, tmp_path) -> None:  # type: ignore[no-untyped-def]
    secret = tmp_path / "digest.key"
    secret.write_text("a deployment secret of some length\n")
    key = load_digest_key(secret)
    srv = start_server_thread(VitcacheConfig.of(digest_key_file=str(secret)), encoder)
    image = png_bytes(84, 56, 9)
    with VitCacheClient(srv.target, options=ConnectOptions.from_files(digest_key_file=str(secret))) as trusted:
        first = trusted.encode([image])[0].raise_for_error()
        again = trusted.encode([image])[0].raise_for_error()
        assert first.digest == digest_file(image, key) != digest_file(image)
        assert again.source == "L1"  # the keyed digest alone found it (hash-first hit)
        plain_lookup = trusted.fetch([digest_file(image)])[0]
        assert plain_lookup.error is not None and plain_lookup.error.code == grpc.StatusCode.NOT_FOUND
    with VitCacheClient(srv.target) as keyless:
        # Without the key its digests never match; it still gets answers by sending the bytes.
        result = keyless.encode([image])[0].raise_for_error()
    assert result.digest == first.digest and result.source == "L1"
    assert srv.engine.stats.not_found == 3  # the first digest round, the plain Fetch, the keyless digest round
    with pytest.raises(ValueError, match="at least 16"):
        short = tmp_path / "short.key"
        short.write_text("short")
        load_digest_key(short)


def test_cli_encode_over_mutual_tls_with_a_token_to_a_fleet(
    start_server_thread, encoder, pki, tmp_path, capsys
) -> None:  # type: ignore[no-untyped-def]
    from vitcache.server.cli import main

    server, client_cert = pki["server"], pki["client"]
    cfg = {
        "tls_cert": str(server.cert),
        "tls_key": str(server.key),
        "tls_client_ca": str(pki["ca"].cert),
        "auth_token_file": str(_token_file(tmp_path)),
    }
    replicas = [start_server_thread(VitcacheConfig.of(**cfg), encoder) for _ in range(2)]
    (tmp_path / "token").write_text("alice-token\n")
    files = []
    for i in range(4):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(png_bytes(56, 56, 40 + i))
    argv = ["encode", *map(str, files), "--target", ",".join(r.target for r in replicas)]
    argv += ["--tls-ca", str(pki["ca"].cert), "--tls-cert", str(client_cert.cert), "--tls-key", str(client_cert.key)]
    assert main([*argv, "--auth-token-file", str(tmp_path / "token")]) == 0
    assert capsys.readouterr().out.count("COMPUTED") == 4
    assert sum(r.engine.stats.misses for r in replicas) == 4
    assert main(argv) == 2  # no token: one line, no traceback
    assert "UNAUTHENTICATED" in capsys.readouterr().err
