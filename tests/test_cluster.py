"""Redis Cluster as L2: a real 3-master cluster of redis-server processes on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from vitcache.client import VitCacheClient

from vitcache.config import VitcacheConfig
from vitcache.digest import digest_file

from .conftest import RedisProcess, png_bytes, redis_server_binary

_BUS_OFFSET = 10000  # a cluster node also listens on port + 10000


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_ports(count: int) -> list[int]:
    """Ports whose cluster-bus port (port + 10000) is free too, below the ephemeral range."""
    ports: list[int] = []
    candidate = 20000 + (os.getpid() * 7) % 9000
    for _ in range(2000):
        candidate = 20000 + (candidate - 20000 + 1) % 9000
        if _port_is_free(candidate) and _port_is_free(candidate + _BUS_OFFSET):
            ports.append(candidate)
            if len(ports) == count:
                return ports
    raise RuntimeError("no free ports for a Redis Cluster")


def _redis_cli() -> str:
    cli = Path(redis_server_binary()).with_name("redis-cli")
    if not os.access(cli, os.X_OK):
        pytest.skip(f"no redis-cli next to {redis_server_binary()}")
    return str(cli)


class RedisCluster:
    """Three masters, no replicas; a node killed and started again rejoins from its nodes.conf."""

    def __init__(self, workdir: Path) -> None:
        self.nodes = []
        for port in _cluster_ports(3):
            node = RedisProcess(
                workdir / str(port),
                args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                ],
            )
            node.port = port
            self.nodes.append(node)

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [_redis_cli(), "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_state("ok")

    def wait_state(self, state: str, timeout_s: float = 30) -> None:
        """Until every running node reports ``cluster_state:<state>``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                running = [node for node in self.nodes if node.proc is not None]
                if all(node.client().cluster("info")["cluster_state"] == state for node in running):
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"Redis Cluster did not reach cluster_state:{state}")

    def keys_per_node(self) -> list[int]:
        return [node.client().dbsize() for node in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_cluster_l2_spreads_entries_survives_a_dead_master_and_reconnects(
    start_server_thread, encoder, redis_cluster
) -> None:  # type: ignore[no-untyped-def]
    cfg = VitcacheConfig.of(redis_url=redis_cluster.url, redis_cluster=True, redis_timeout_s=0.3)
    images = [png_bytes(56, 56, 300 + i) for i in range(12)]
    writer = start_server_thread(cfg, encoder)
    with VitCacheClient(writer.target) as client:
        assert all(r.ok for r in client.encode(images))
        assert client.stats().redis_connected
    writer.call(writer.engine.drain())
    per_node = redis_cluster.keys_per_node()
    assert sum(per_node) == 12 and sum(1 for n in per_node if n) >= 2  # spread by hash slot
    key = f"vitcache:v1:{encoder.namespace}:{digest_file(images[0]).hex()}"
    owner = redis.RedisCluster.from_url(redis_cluster.url)
    owner.delete(key)
    owner.rpush(key, "not a value")  # a key of the wrong type: a corrupt entry, not a cluster failure

    reader = start_server_thread(cfg, encoder)  # empty L1: everything comes from the cluster
    with VitCacheClient(reader.target) as client:
        assert [r.source for r in client.fetch([r.digest for r in client.encode(images)])] == ["L1"] * 12
        stats = client.stats()
        assert stats.l2_hits == 11 and stats.images_computed == 1 and stats.l2_corrupt == 1
        assert stats.redis_connected and stats.l2_errors == 0
        reader.call(reader.engine.drain())
        assert owner.type(key) == b"string"  # overwritten by the recomputation
        owner.close()

        redis_cluster.nodes[1].kill()
        redis_cluster.wait_state("fail")  # the others notice (node timeout) and refuse all keys
        fresh = [png_bytes(56, 84, 400 + i) for i in range(6)]
        during = client.encode(fresh)  # no failed request while the cluster is down
        assert all(r.ok and r.source == "COMPUTED" for r in during)
        assert not client.stats().redis_connected

        redis_cluster.nodes[1].start()  # same port and nodes.conf: it rejoins with its slots
        redis_cluster.wait_state("ok")
        for attempt in range(50):  # the tier re-learns the slot map after its backoff
            assert client.encode([png_bytes(84, 56, 500 + attempt)])[0].ok
            if client.stats().redis_connected:
                break
            time.sleep(0.2)
        assert client.stats().redis_connected
    reader.call(reader.engine.drain())
    assert sum(redis_cluster.keys_per_node()) > sum(per_node) - per_node[1]  # writes flow again (node 1 lost its)


def test_compose_fleet_profile_wires_two_replicas_to_a_three_node_cluster() -> None:
    """docker-compose.yml's fleet profile, checked without a Docker engine."""
    import yaml

    services = yaml.safe_load((Path(__file__).resolve().parents[1] / "docker-compose.yml").read_text())["services"]
    fleet = {name for name, service in services.items() if "fleet" in service.get("profiles", [])}
    nodes = sorted(name for name in fleet if name.startswith("redis-node-"))
    replicas = sorted(name for name in fleet if name.startswith("vitcache-"))
    assert len(nodes) == 3 and len(replicas) == 2
    init = " ".join(services["redis-cluster-init"]["command"])
    assert all(f"{node}:6379" in init for node in nodes) and "--cluster-replicas 0" in init
    for node in nodes:
        assert ["--cluster-announce-hostname", node] == [
            arg for arg in services[node]["command"] if arg in ("--cluster-announce-hostname", node)
        ]
    host_ports = set()
    for name in replicas:
        command = services[name]["command"]
        assert "--redis-cluster" in command and f"--redis-url=redis://{nodes[0]}:6379/0" in command
        assert services[name]["depends_on"] == {"redis-cluster-init": {"condition": "service_completed_successfully"}}
        host_ports.update(port.split(":")[0] for port in services[name]["ports"])
    assert len(host_ports) == 4  # gRPC and metrics of each replica on their own host ports
