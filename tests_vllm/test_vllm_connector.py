"""VitcacheECConnector loaded by vLLM 0.33.0's own factory, against a real vitcache server (tiny-random Qwen2.5-VL).

vLLM's config comes from its own unit-test builder (tests/v1/ec_connector/unit/utils.py, from the sdist) with our
ECTransferConfig; requests are vLLM's ``Request`` with its ``MultiModalFeatureSpec``.
"""

from __future__ import annotations

import ast
import socket
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
from vllm.distributed.ec_transfer.ec_connector.utils import ECOutputAggregator
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import ECConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request

ROOT = Path(__file__).resolve().parent.parent


def connector(role: str, side: ECConnectorRole, target: str, **extra: object) -> VitcacheECConnector:
    config = create_ec_vllm_config(ec_role=role, dtype=torch.float32)
    config.use_v2_model_runner = True  # vLLM's default where it has Triton
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


class Engine:
    """The calls vLLM 0.33.0 makes on the connectors in a step, in its order: the Scheduler's ``schedule`` (one
    prefill, no chunking), the V2 model runner around the forward (``no_forward`` when nothing is scheduled), vLLM's
    ``ECOutputAggregator`` over the TP ranks, then ``update_from_output`` (``take_unavailable_requests`` before
    ``update_connector_output``). Every tensor a worker puts in ``encoder_cache`` is recorded."""

    def __init__(self, scheduler: VitcacheECConnector, *workers: VitcacheECConnector) -> None:
        self.scheduler, self.workers = scheduler, workers
        self.caches: list[dict[str, torch.Tensor]] = [{} for _ in workers]
        self.waiting: dict[str, Request] = {}
        self.forwarded: dict[str, list[torch.Tensor]] = {}  # request id -> its items as rank 0's forward read them
        self.failed: set[str] = set()

    def add(self, *requests: Request) -> None:
        self.waiting.update((r.request_id, r) for r in requests)

    def abort(self, request_id: str) -> None:
        self.scheduler.request_finished(self.waiting.pop(request_id))

    def step(self) -> None:
        scheduled = []
        for req in list(self.waiting.values()):
            if not self.scheduler.ensure_cache_available(req, 0):
                continue
            for index, feature in enumerate(req.mm_features):
                assert self.scheduler.has_cache_item(feature.identifier), "only vitcache can supply these items"
                self.scheduler.update_state_after_alloc(req, index)
            scheduled.append(self.waiting.pop(req.request_id))
        meta = self.scheduler.build_connector_meta(SchedulerOutput.make_empty())
        outputs = []
        for worker, cache in zip(self.workers, self.caches, strict=True):
            worker.bind_connector_metadata(meta)
            worker.start_load_caches(cache)
            for req in scheduled:  # the forward: vLLM raises "Encoder cache miss" for an absent item
                items = [cache[f.identifier] for f in req.mm_features]
                self.forwarded.setdefault(req.request_id, items)
            report = ECConnectorOutput(ec_connector_worker_meta=worker.build_connector_worker_meta())
            outputs.append(ModelRunnerOutput.with_ec_conn_output_only(report))
            worker.clear_connector_metadata()
        output = ECOutputAggregator().aggregate(outputs)
        assert output is not None
        failed = self.scheduler.take_unavailable_requests()
        self.failed |= failed
        for request_id in failed & self.waiting.keys():  # vLLM ignores ids of requests already finished
            self.abort(request_id)
        if output.ec_connector_output is not None:
            self.scheduler.update_connector_output(output.ec_connector_output)
        for req in scheduled:
            self.scheduler.request_finished(req)

    def run(self, steps: int = 4) -> None:
        for _ in range(steps):
            self.step()

    def staged(self) -> int:
        """Stages the workers hold on their devices."""
        return sum(len(worker._staged) for worker in self.workers)


def load(worker: VitcacheECConnector, scheduler: VitcacheECConnector, *requests: Request) -> dict[str, torch.Tensor]:
    """The requests run through vLLM's steps; what their one forward read from ``encoder_cache``."""
    engine = Engine(scheduler, worker)
    engine.add(*requests)
    engine.run()
    assert not engine.failed and not engine.waiting and engine.staged() == 0
    forwarded = [zip(r.mm_features, engine.forwarded[r.request_id], strict=True) for r in requests]
    return {feature.identifier: tensor for items in forwarded for feature, tensor in items}


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
    loaded = load(worker, scheduler, request("r1", identifier, fetched.shape[0]))
    assert loaded[identifier].dtype == fetched.dtype
    assert torch.equal(loaded[identifier], fetched)


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
        requests = [request(f"fleet-{n}", i, tensor.shape[0]) for n, (i, tensor) in enumerate(wanted.items())]
        loaded = load(worker, scheduler, *requests)
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
    assert torch.equal(load(worker, scheduler, request("r2", mm_hash, 6))[mm_hash], computed)


def test_a_consumer_does_not_save(server: RunningServer) -> None:
    consumer = connector("ec_consumer", ECConnectorRole.WORKER, server.target)
    consumer.save_caches({"only-here": torch.ones(2, 4)}, "only-here")
    scheduler = connector("ec_producer", ECConnectorRole.SCHEDULER, server.target)
    assert not scheduler.has_cache_item("only-here")


def assert_failed_before_any_forward(engine: Engine, request_id: str) -> None:
    """vLLM failed the request (take_unavailable_requests) and no forward ran on anything for it."""
    assert engine.failed == {request_id}
    assert not engine.forwarded and all(cache == {} for cache in engine.caches)
    assert engine.staged() == 0 and not engine.scheduler._stages and engine.scheduler._staging_bytes == 0


def test_an_entry_evicted_or_vitcache_killed_before_staging_fails_the_request_before_any_forward() -> None:
    small = start_server("--l1-bytes", "96KiB")  # no Redis: an entry pushed out of L1 is gone
    entries = {key: torch.randn(64, 128) for key in ("e1" * 32, "e2" * 32, "e3" * 32)}  # 32 KiB each
    evicted, staged_first, doomed = (request(f"r-{n}", key, 64) for n, key in enumerate(entries))
    try:
        scheduler = connector("ec_consumer", ECConnectorRole.SCHEDULER, small.target)
        worker = connector("ec_consumer", ECConnectorRole.WORKER, small.target)
        with VitCacheClient(small.target) as client:
            # evicted between the scheduler's check and the workers' staging
            assert client.put({"e1" * 32: [entries["e1" * 32]]}) == [None]
            engine = Engine(scheduler, worker)
            engine.add(evicted)
            assert not scheduler.ensure_cache_available(evicted, 0)  # present: deferred, staging queued
            for n in range(4):  # the LRU pushes the first entry out
                assert client.put({f"filler-{n}": [torch.randn(64, 128)]}) == [None]
            assert not client.fetch([], keys=["e1" * 32], metadata_only=True)[0].ok
            engine.run()
            assert_failed_before_any_forward(engine, "r-0")
            # vitcache killed between the check and the staging; an entry staged before the kill still loads
            assert client.put({key: [entries[key]] for key in ("e2" * 32, "e3" * 32)}) == [None, None]
        engine = Engine(scheduler, worker)
        engine.add(staged_first)
        engine.step()
        assert scheduler.has_cache_item("e2" * 32)
        engine.add(doomed)
        assert not scheduler.ensure_cache_available(doomed, 0)
        small.stop()
        engine.run()
    finally:
        small.stop()
    assert engine.failed == {"r-2"}
    assert list(engine.forwarded) == ["r-1"] and torch.equal(engine.forwarded["r-1"][0], entries["e2" * 32])
    assert set(engine.caches[0]) == {"e2" * 32}  # nothing made up for r-2
    assert engine.staged() == 0 and not scheduler._stages


def test_a_stage_one_tp_rank_cannot_stage_fails_and_is_dropped_from_the_ranks_that_did(server: RunningServer) -> None:
    """Staged means staged on every TP rank: here rank 1 cannot reach vitcache (nothing listens on its target)."""
    with VitCacheClient(server.target) as client:
        encoded = client.encode([image(4)])[0].raise_for_error()
    identifier, tokens = encoded.digest.hex(), encoded.embeddings[0].shape[0]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{probe.getsockname()[1]}"
    scheduler = connector("ec_consumer", ECConnectorRole.SCHEDULER, server.target)
    ranks = [connector("ec_consumer", ECConnectorRole.WORKER, target) for target in (server.target, nowhere)]
    engine = Engine(scheduler, *ranks)
    engine.add(request("r-tp", identifier, tokens))
    engine.step()
    assert len(ranks[0]._staged) == 1 and not ranks[1]._staged
    assert scheduler.has_pending_push_work()  # the drop for rank 0 keeps the engine stepping
    engine.run()
    assert_failed_before_any_forward(engine, "r-tp")
    assert not scheduler.has_pending_push_work()
    both = Engine(scheduler, ranks[0], connector("ec_consumer", ECConnectorRole.WORKER, server.target))
    both.add(request("r-tp-ok", identifier, tokens))
    both.run()
    assert not both.failed and all(torch.equal(cache[identifier], encoded.embeddings[0]) for cache in both.caches)


def test_an_aborted_request_frees_its_staging_and_staging_is_bounded(server: RunningServer) -> None:
    entry = torch.randn(16, 32)  # 2 KiB, float32 at the test model's width: the scheduler's estimate is exact
    keys = [f"{n:02x}" * 32 for n in range(3)]
    with VitCacheClient(server.target) as client:
        assert client.put({key: [entry + n] for n, key in enumerate(keys)}) == [None] * 3
    room = {"staging_bytes": str(entry.nbytes * 2)}
    scheduler = connector("ec_consumer", ECConnectorRole.SCHEDULER, server.target, **room)
    worker = connector("ec_consumer", ECConnectorRole.WORKER, server.target, **room)
    engine = Engine(scheduler, worker)
    engine.add(request("aborted", keys[0], 16))
    engine.step()
    assert engine.staged() == 1
    engine.abort("aborted")
    engine.step()
    assert engine.staged() == 0 and not scheduler._stages and scheduler._staging_bytes == 0
    # three requests, room for two entries: the third waits for room instead of failing
    engine.add(*(request(f"bounded-{n}", key, 16) for n, key in enumerate(keys)))
    for _ in range(6):
        engine.step()
        assert worker._staged_bytes <= entry.nbytes * 2
    assert not engine.failed and not engine.waiting
    assert all(torch.equal(engine.forwarded[f"bounded-{n}"][0], entry + n) for n in range(3))
    # an entry larger than all the room fails its request (no image to encode instead) rather than wait forever
    tiny = {"staging_bytes": "1024"}
    alone = Engine(connector("ec_consumer", ECConnectorRole.SCHEDULER, server.target, **tiny), worker)
    alone.add(request("too-large", keys[0], 16))
    alone.run()
    assert_failed_before_any_forward(alone, "too-large")
    # a worker enforces its own room too, whatever the scheduler estimated
    refusing = Engine(
        connector("ec_consumer", ECConnectorRole.SCHEDULER, server.target),
        connector("ec_consumer", ECConnectorRole.WORKER, server.target, **tiny),
    )
    refusing.add(request("no-room", keys[0], 16))
    refusing.run()
    assert_failed_before_any_forward(refusing, "no-room")


def test_a_chunked_prefill_does_not_stage_again_what_vllm_holds_until_a_preemption(server: RunningServer) -> None:
    key = "c4" * 32
    with VitCacheClient(server.target) as client:
        assert client.put({key: [torch.randn(16, 32)]}) == [None]
    scheduler = connector("ec_consumer", ECConnectorRole.SCHEDULER, server.target)
    worker = connector("ec_consumer", ECConnectorRole.WORKER, server.target)
    engine = Engine(scheduler, worker)
    req = request("chunked", key, 16)
    assert not scheduler.ensure_cache_available(req, 0)
    engine.step()  # staged
    assert scheduler.ensure_cache_available(req, 0)
    scheduler.update_state_after_alloc(req, 0)  # the first chunk loads it; its tokens 1..8 are computed
    engine.step()
    assert key in engine.caches[0] and engine.staged() == 0
    assert scheduler.ensure_cache_available(req, 8)  # the second chunk: vLLM still holds it
    assert not scheduler._stages
    req.num_preemptions += 1  # vLLM's preemption frees the request's encoder inputs
    assert not scheduler.ensure_cache_available(req, 0)
    assert key in scheduler._stages


def test_a_request_waiting_past_stage_wait_s_is_failed(server: RunningServer) -> None:
    entry = torch.randn(16, 32)
    keys = [f"{n:02x}" * 32 for n in range(4, 6)]
    with VitCacheClient(server.target) as client:
        assert client.put({key: [entry] for key in keys}) == [None] * 2
    extra = {"staging_bytes": str(entry.nbytes), "stage_wait_s": "1e-9"}
    scheduler = connector("ec_consumer", ECConnectorRole.SCHEDULER, server.target, **extra)
    first, second = request("first", keys[0], 16), request("second", keys[1], 16)
    assert not scheduler.ensure_cache_available(first, 0)  # takes all the room
    assert not scheduler.ensure_cache_available(second, 0)  # waits for room
    assert not scheduler.ensure_cache_available(second, 0)  # ... longer than stage_wait_s
    assert scheduler.take_unavailable_requests() == {"second"}


def test_a_consumer_needs_vllm_s_v2_model_runner(server: RunningServer) -> None:
    config = create_ec_vllm_config(ec_role="ec_consumer", dtype=torch.float32)
    config.use_v2_model_runner = False
    config.ec_transfer_config = ECTransferConfig(
        ec_connector="VitcacheECConnector",
        ec_connector_module_path="vitcache.integrations.vllm",
        ec_role="ec_consumer",
        ec_connector_extra_config={"target": server.target},
    )
    with pytest.raises(ValueError, match="V2 model runner"):
        ECConnectorFactory.create_connector(config, ECConnectorRole.SCHEDULER)
    with pytest.raises(ValueError, match="staging_bytes must be a positive number"):
        connector("ec_consumer", ECConnectorRole.WORKER, server.target, staging_bytes="2GiB")


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
        loaded = load(
            side("ec_consumer", ECConnectorRole.WORKER, "a"),
            side("ec_consumer", ECConnectorRole.SCHEDULER, "a"),
            request("a", mm_hash, 3),
        )
        assert torch.equal(loaded[mm_hash], torch.ones(3, 8))
        assert not side("ec_consumer", ECConnectorRole.SCHEDULER, "b").ensure_cache_available(
            request("b", mm_hash, 3), 0
        )
        # without the token the server refuses the lookup: a miss, not an exception in vLLM's scheduler
        anonymous = connector("ec_consumer", ECConnectorRole.SCHEDULER, secured.target)
        assert not anonymous.ensure_cache_available(request("anonymous", mm_hash, 3), 0)
        assert anonymous.take_unavailable_requests() == {"anonymous"}
    finally:
        secured.stop()
