"""VitcacheECConnector loaded by vLLM 0.33.0's own factory, against a real vitcache server (tiny-random Qwen2.5-VL).

vLLM's config comes from its own unit-test builder (tests/v1/ec_connector/unit/utils.py, from the sdist) with our
ECTransferConfig; requests are vLLM's ``Request`` with its ``MultiModalFeatureSpec``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RunningServer, start_server
from tests.v1.ec_connector.unit.utils import create_ec_vllm_config
from vitcache.client import FleetClient, VitCacheClient
from vitcache.integrations.vllm import VitcacheECConnector
from vllm.config.ec_transfer import ECTransferConfig
from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorRole
from vllm.distributed.ec_transfer.ec_connector.factory import ECConnectorFactory
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm.sampling_params import SamplingParams
from vllm.v1.outputs import ECConnectorOutput
from vllm.v1.request import Request

ROOT = Path(__file__).resolve().parent.parent


def connector(role: str, side: ECConnectorRole, target: str, **extra: str) -> VitcacheECConnector:
    config = create_ec_vllm_config(ec_role=role, dtype=torch.float32)
    config.ec_transfer_config = ECTransferConfig(
        ec_connector="VitcacheECConnector",
        ec_connector_module_path="vitcache.integrations.vllm",
        ec_role=role,
        ec_connector_extra_config={"target": target, "timeout_s": 5, **extra},
    )
    built = ECConnectorFactory.create_connector(config, side)
    assert isinstance(built, VitcacheECConnector)
    return built


def request(request_id: str, identifier: str, tokens: int) -> Request:
    feature = MultiModalFeatureSpec(
        data=None, modality="image", identifier=identifier, mm_position=PlaceholderRange(offset=1, length=tokens)
    )
    return Request(request_id, [0] * (tokens + 2), SamplingParams(max_tokens=1), None, mm_features=[feature])


def schedule(scheduler: VitcacheECConnector, req: Request) -> None:
    """What vLLM's scheduler does for a request whose one image is loaded externally."""
    assert scheduler.ensure_cache_available(req, 0)
    assert scheduler.has_cache_item(req.mm_features[0].identifier)
    scheduler.update_state_after_alloc(req, 0)


def load(worker: VitcacheECConnector, scheduler: VitcacheECConnector) -> dict[str, torch.Tensor]:
    """What vLLM's model runner does around a step (ec_connector_model_runner_mixin)."""
    encoder_cache: dict[str, torch.Tensor] = {}
    worker.bind_connector_metadata(scheduler.build_connector_meta(None))  # type: ignore[arg-type]
    worker.start_load_caches(encoder_cache)
    worker.clear_connector_metadata()
    return encoder_cache


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (56, 84, 3), dtype=np.uint8)


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_an_image_encoded_by_vitcache_and_scheduled_by_digest_loads_the_bytes_fetch_returns(
    server: RunningServer, transport: str
) -> None:
    with VitCacheClient(server.target) as client:
        encoded = client.encode([image(1)])[0].raise_for_error()
        fetched = client.fetch([encoded.digest])[0].raise_for_error().embeddings[0]
    identifier = encoded.digest.hex()
    scheduler = connector("ec_consumer", ECConnectorRole.SCHEDULER, server.target)
    shm = {"shm_socket": server.shm_socket} if transport == "shm" else {}
    worker = connector("ec_consumer", ECConnectorRole.WORKER, server.target, **shm)
    schedule(scheduler, request("r1", identifier, fetched.shape[0]))
    loaded = load(worker, scheduler)
    assert loaded[identifier].dtype == fetched.dtype
    assert torch.equal(loaded[identifier], fetched)
    assert worker.build_connector_worker_meta() is None
    assert scheduler.take_unavailable_requests() == set()


def test_a_fleet_target_routes_each_identifier_to_the_replica_that_holds_it(server: RunningServer) -> None:
    """Two replicas with no shared L2: an identifier is found only if both the producer's Put and the
    consumer's lookup go to the replica its rendezvous order picks, as FleetClient's encode does."""
    second = start_server()
    try:
        fleet = f"{server.target},{second.target}"
        with FleetClient([server.target, second.target]) as client:
            encoded = [r.raise_for_error() for r in client.encode([image(seed) for seed in range(20, 26)])]
        saved = {f"{seed:02x}" * 32: torch.randn(4, 48, dtype=torch.bfloat16) for seed in range(6)}
        producer = connector("ec_producer", ECConnectorRole.WORKER, fleet)
        for mm_hash, tensor in saved.items():
            producer.save_caches({mm_hash: tensor}, mm_hash)
        scheduler = connector("ec_consumer", ECConnectorRole.SCHEDULER, fleet)
        worker = connector("ec_consumer", ECConnectorRole.WORKER, fleet)
        wanted = {r.digest.hex(): r.embeddings[0] for r in encoded} | saved
        for n, (identifier, tensor) in enumerate(wanted.items()):
            schedule(scheduler, request(f"fleet-{n}", identifier, tensor.shape[0]))
        loaded = load(worker, scheduler)
        assert set(loaded) == set(wanted)
        assert all(torch.equal(loaded[i], wanted[i]) for i in wanted)
        with pytest.raises(ValueError, match="shm_socket is one server's"):
            connector("ec_consumer", ECConnectorRole.WORKER, fleet, shm_socket="/tmp/x.sock")
    finally:
        second.stop()


def test_save_caches_of_a_producer_is_loaded_by_a_consumer(server: RunningServer) -> None:
    mm_hash = "b3" * 32  # vLLM's mm_hash: 64 hex characters of blake3
    computed = torch.randn(6, 48, dtype=torch.bfloat16)
    producer = connector("ec_producer", ECConnectorRole.WORKER, server.target)
    producer.save_caches({mm_hash: computed}, mm_hash)
    scheduler = connector("ec_consumer", ECConnectorRole.SCHEDULER, server.target)
    worker = connector("ec_consumer", ECConnectorRole.WORKER, server.target)
    schedule(scheduler, request("r2", mm_hash, 6))
    assert torch.equal(load(worker, scheduler)[mm_hash], computed)


def test_a_consumer_does_not_save(server: RunningServer) -> None:
    consumer = connector("ec_consumer", ECConnectorRole.WORKER, server.target)
    consumer.save_caches({"only-here": torch.ones(2, 4)}, "only-here")
    scheduler = connector("ec_consumer", ECConnectorRole.SCHEDULER, server.target)
    assert not scheduler.has_cache_item("only-here")


def test_an_entry_gone_or_vitcache_down_at_load_fails_the_request_without_raising(server: RunningServer) -> None:
    with VitCacheClient(server.target) as client:
        encoded = client.encode([image(2)])[0].raise_for_error()
    identifier, tokens = encoded.digest.hex(), encoded.embeddings[0].shape[0]
    scheduler = connector("ec_consumer", ECConnectorRole.SCHEDULER, server.target)
    elsewhere = start_server()  # a server without the entry: what a worker sees after an eviction
    try:
        worker = connector("ec_consumer", ECConnectorRole.WORKER, elsewhere.target)
        for attempt, stop_before_load in (("evicted", False), ("down", True)):
            req = request(f"r-{attempt}", identifier, tokens)
            schedule(scheduler, req)
            if stop_before_load:
                elsewhere.stop()
            loaded = load(worker, scheduler)
            # vLLM's model runner raises on a missing entry: the step gets a placeholder of the right shape ...
            assert loaded[identifier].shape == (tokens, encoded.embeddings[0].shape[1])
            meta = worker.build_connector_worker_meta()
            assert meta is not None
            # ... and the scheduler fails the request (vLLM: FINISHED_ERROR, retryable) on its next update.
            scheduler.update_connector_output(ECConnectorOutput(ec_connector_worker_meta=meta))
            assert scheduler.take_unavailable_requests() == {req.request_id}, attempt
            assert scheduler.take_unavailable_requests() == set()
    finally:
        elsewhere.stop()


def test_vitcache_down_at_scheduling_is_a_miss_and_a_request_without_an_image_is_failed() -> None:
    down = start_server()
    down.stop()
    scheduler = connector("ec_consumer", ECConnectorRole.SCHEDULER, down.target)
    assert not scheduler.has_cache_item("ab" * 16)
    req = request("r-noimage", "cd" * 16, 4)  # uuid + grid only (EPD): nothing vLLM could encode itself
    assert not scheduler.ensure_cache_available(req, 0)
    assert scheduler.take_unavailable_requests() == {"r-noimage"}


def test_lookups_of_a_request_are_one_fetch_and_memoised(server: RunningServer) -> None:
    scheduler = connector("ec_consumer", ECConnectorRole.SCHEDULER, server.target)
    calls: list[int] = []
    fetch = scheduler._client.fetch

    def counting_fetch(*args, **kwargs):  # counts the real client's calls; the server answers them
        calls.append(len(kwargs.get("keys", ())))
        return fetch(*args, **kwargs)

    scheduler._client.fetch = counting_fetch  # type: ignore[method-assign]
    features = [
        MultiModalFeatureSpec(
            data=None, modality="image", identifier=f"id-{i}", mm_position=PlaceholderRange(offset=i * 4, length=4)
        )
        for i in range(5)
    ]
    req = Request("r-batch", [0] * 20, SamplingParams(max_tokens=1), None, mm_features=features)
    scheduler.ensure_cache_available(req, 0)
    for feature in features:
        scheduler.has_cache_item(feature.identifier)
    assert calls == [5]


def test_the_connector_imports_only_vitcache_s_client_side() -> None:
    tree = ast.parse((ROOT / "integrations" / "vllm.py").read_text())
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert {m for m in modules if m.startswith("vitcache")} == {
        "vitcache.client",
        "vitcache.v1",
        "vitcache.integrations.vllm_layout",
    }
    check = (
        "import sys, vitcache.client; assert 'transformers' not in sys.modules, 'transformers'; "
        "import vitcache.integrations.vllm; "
        "bad = [m for m in sys.modules if m.startswith(('vitcache.server', 'vitcache.models', 'vitcache.engine'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", check], check=True)


def test_token_and_tenant_from_extra_config_scope_what_a_consumer_sees(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("gateway\n")  # an unbound token: the caller names its tenant
    token_file = tmp_path / "token"
    token_file.write_text("gateway\n")
    secured = start_server("--auth-token-file", str(tokens))
    try:

        def side(role: str, which: ECConnectorRole, tenant: str) -> VitcacheECConnector:
            return connector(role, which, secured.target, auth_token_file=str(token_file), tenant=tenant)

        mm_hash = "c5" * 32
        side("ec_producer", ECConnectorRole.WORKER, "a").save_caches({mm_hash: torch.ones(3, 8)}, mm_hash)
        assert side("ec_consumer", ECConnectorRole.SCHEDULER, "a").has_cache_item(mm_hash)
        assert not side("ec_consumer", ECConnectorRole.SCHEDULER, "b").has_cache_item(mm_hash)
        # without the token the server refuses the lookup: a miss, not an exception in vLLM's scheduler
        assert not connector("ec_consumer", ECConnectorRole.SCHEDULER, secured.target).has_cache_item(mm_hash)
    finally:
        secured.stop()
