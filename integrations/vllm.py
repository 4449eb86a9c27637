"""vLLM encoder-cache connector backed by vitcache (vLLM 0.33.0's ``ECConnectorBase``).

Enable it with::

    --ec-transfer-config '{"ec_connector": "VitcacheECConnector",
        "ec_connector_module_path": "vitcache.integrations.vllm", "ec_role": "ec_consumer",
        "ec_connector_extra_config": {"target": "vitcache:50051"}}'

``ec_connector_extra_config`` keys: ``target`` (host:port, or several comma-separated for a fleet),
``shm_socket`` (the server's ``--shm-socket``, same host, one target only), ``tls_ca``, ``tls_cert``, ``tls_key``,
``auth_token_file`` (paths), ``tenant``, ``timeout_s`` (default 5), ``staging_bytes`` (default 2 GiB: how much of
a worker's device memory entries may hold between their fetch and their use), ``stage_wait_s`` (default 60).

Consumers stage entries before use, as vLLM's own ECCPUConnector and ECMooncakeConnector do: the scheduler defers a
request (``ensure_cache_available`` returns False) and asks the workers to prefetch its entries onto their devices;
once every rank reports them staged, the request is scheduled and the forward only moves staged tensors into
``encoder_cache``. An entry no rank can stage (vitcache down, evicted, wrong token count, no room) makes vLLM encode
the image itself when the request carries it, else fails the request through ``take_unavailable_requests`` before
it is ever scheduled: the model never runs on values vitcache did not deliver.

Identifiers: vLLM keys every multimodal item by ``MultiModalFeatureSpec.identifier`` (its mm_hash, or the
request's ``uuid`` verbatim). An identifier that is a vitcache digest (32 hex characters, as the EPD proxy helper
below sends) names the entry vitcache computed from the image's or video's bytes; any other (vLLM's mm_hash is 64)
names an entry in the key space that producers fill with ``Put`` (a key can never shadow a computed entry). A video's
entry loads as vLLM's Qwen models return a video's encoder output, one row per embedding position of its
placeholder (Qwen3-VL's "<t seconds>" text between the temporal groups is not one).

Only vitcache's client side is imported here (no transformers, no server), so this loads inside vLLM's environment.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import torch
from vitcache.client import ConnectOptions, EncodedImage, FleetClient, VitCacheClient
from vitcache.integrations.vllm_layout import to_device, vllm_layout
from vitcache.v1 import vitcache_pb2 as pb
from vllm.distributed.ec_transfer.ec_connector.base import (
    ECConnectorBase,
    ECConnectorMetadata,
    ECConnectorRole,
    ECConnectorWorkerMetadata,
)
from vllm.distributed.ec_transfer.ec_connector.utils import PlaceholderMetadataResolver

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.multimodal.inputs import MultiModalFeatureSpec
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import ECConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

_DIGEST = re.compile(r"[0-9a-f]{32}")
_PRESENT_MEMO = 1 << 16  # identifiers remembered as present; vitcache may evict them, which staging handles
_WARN_EVERY_S = 30.0
_DEFAULT_STAGING_BYTES = 2 << 30


def _digest_of(identifier: str) -> bytes | None:
    return bytes.fromhex(identifier) if _DIGEST.fullmatch(identifier) else None


def _positive(extra: dict[str, Any], name: str, default: float, kind: type[int] | type[float]) -> Any:
    """``extra[name]`` as a positive ``kind`` (extra config arrives untyped, often as strings)."""
    raw = extra.get(name, default)
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        value = 0
    if value <= 0:
        raise ValueError(
            f"VitcacheECConnector: ec_connector_extra_config.{name} must be a positive number, got {raw!r}"
        )
    return value


@dataclass(frozen=True)
class ConnectorSettings:
    """``ec_connector_extra_config``: where vitcache is and how to reach it (the client's options)."""

    targets: tuple[str, ...]
    shm_socket: str | None = None
    options: ConnectOptions = field(default_factory=ConnectOptions)
    timeout_s: float = 5.0
    staging_bytes: int = _DEFAULT_STAGING_BYTES
    stage_wait_s: float = 60.0

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any]) -> ConnectorSettings:
        target = str(extra.get("target", "")).strip()
        if not target:
            raise ValueError(
                "VitcacheECConnector needs ec_connector_extra_config.target: the vitcache server's host:port "
                "(or several, comma-separated, for a fleet)"
            )
        options = ConnectOptions.from_files(
            tls_ca=extra.get("tls_ca"),
            tls_cert=extra.get("tls_cert"),
            tls_key=extra.get("tls_key"),
            auth_token_file=extra.get("auth_token_file"),
            tenant=extra.get("tenant"),
        )
        targets = tuple(t.strip() for t in target.split(",") if t.strip())
        if len(targets) > 1 and extra.get("shm_socket"):
            raise ValueError(
                f"VitcacheECConnector: shm_socket is one server's, but target {target!r} names {len(targets)}; "
                "give one host:port with shm_socket, or drop shm_socket for a fleet"
            )
        return cls(
            targets=targets,
            shm_socket=extra.get("shm_socket"),
            options=options,
            timeout_s=float(extra.get("timeout_s", 5.0)),
            staging_bytes=_positive(extra, "staging_bytes", _DEFAULT_STAGING_BYTES, int),
            stage_wait_s=_positive(extra, "stage_wait_s", 60.0, float),
        )

    def client(self) -> VitCacheClient | FleetClient:
        """One server's client, or a fleet's (each identifier asked of the replica that should hold it)."""
        if len(self.targets) > 1:
            return FleetClient(self.targets, options=self.options)
        return VitCacheClient(self.targets[0], options=self.options, shm_socket=self.shm_socket)


def lookup(
    client: VitCacheClient | FleetClient, identifiers: Sequence[str], metadata_only: bool, timeout_s: float
) -> dict[str, EncodedImage]:
    """The entries vitcache holds for ``identifiers`` (absent ones left out), in one Fetch (the client
    splits one of more than 256): digest identifiers as digests, the others as Put keys."""
    digests = [(identifier, d) for identifier in identifiers if (d := _digest_of(identifier)) is not None]
    keys = [identifier for identifier in identifiers if _digest_of(identifier) is None]
    results = client.fetch([d for _, d in digests], timeout_s, keys=keys, metadata_only=metadata_only)
    asked = [identifier for identifier, _ in digests] + keys
    return {identifier: result for identifier, result in zip(asked, results, strict=True) if result.ok}


@dataclass
class StageItem:
    """One entry to stage or to load; ``stage_id`` tells a later staging of the same identifier from this one."""

    stage_id: int
    identifier: str
    num_tokens: int


@dataclass
class VitcacheConnectorMetadata(ECConnectorMetadata):
    """Scheduler -> workers, applied in this order: drop stages no request needs any more, move staged entries into
    ``encoder_cache`` (this step's forward reads them), fetch new stages (one Fetch)."""

    drops: list[int] = field(default_factory=list)
    loads: list[StageItem] = field(default_factory=list)
    prefetches: list[StageItem] = field(default_factory=list)


@dataclass
class VitcacheWorkerMetadata(ECConnectorWorkerMetadata):
    """Workers -> scheduler: stages now held (stage id -> bytes on the device) and stages that could not be."""

    staged: dict[int, int] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)

    def aggregate(self, other: ECConnectorWorkerMetadata) -> ECConnectorWorkerMetadata:
        """Every TP rank gathers the embedding from its own device: staged means staged on all of them, and one
        rank's failure fails the stage (ranks apply the same metadata in the same step, so their reports align)."""
        assert isinstance(other, VitcacheWorkerMetadata)
        staged = {stage: size for stage, size in self.staged.items() if stage in other.staged}
        return VitcacheWorkerMetadata(staged, self.failed | other.failed)


@dataclass
class Stage:
    """Scheduler side: an entry the workers fetch (``sent``) or hold (``ready``) for the requests waiting on it."""

    item: StageItem
    modality: str
    nbytes: int  # estimated until the workers report what they hold
    requests: dict[str, Request] = field(default_factory=dict)
    sent: bool = False
    ready: bool = False


class VitcacheECConnector(ECConnectorBase):
    """Encoder outputs from vitcache: consumers stage them and load them into ``encoder_cache``, producers ``Put``."""

    def __init__(self, vllm_config: VllmConfig, role: ECConnectorRole) -> None:
        super().__init__(vllm_config=vllm_config, role=role)
        assert vllm_config.ec_transfer_config is not None
        if self.is_consumer and not vllm_config.use_v2_model_runner:
            # vLLM's V1 runner skips the connector in a step that schedules no tokens, so requests deferred until
            # their entries are staged would wait forever once nothing else runs.
            raise ValueError(
                "VitcacheECConnector as a consumer needs vLLM's V2 model runner (its default): "
                "unset VLLM_USE_V2_MODEL_RUNNER=0, or drop what the log says V2 does not support"
            )
        self.settings = ConnectorSettings.from_extra_config(vllm_config.ec_transfer_config.ec_connector_extra_config)
        self._client = self.settings.client()
        self._last_warning = 0.0
        # scheduler side
        self._present: OrderedDict[str, None] = OrderedDict()
        self._absent_this_step: set[str] = set()
        self._stages: dict[str, Stage] = {}  # identifier -> its current stage
        self._stage_ids: dict[int, Stage] = {}
        self._next_stage_id = 0
        self._staging_bytes = 0  # what the live stages hold (or will) on each worker
        self._bytes_per_token: dict[str, float] = {}  # modality -> learnt from the workers' reports
        self._loads: list[StageItem] = []
        self._drops: list[int] = []
        self._deferred_since: dict[str, float] = {}  # request id -> when it first waited for staging
        self._encode_locally: dict[str, set[str]] = {}  # request id -> identifiers vitcache could not deliver
        self._loaded: dict[str, tuple[int, set[str]]] = {}  # request id -> (its preemptions, identifiers loaded)
        self._unavailable: set[str] = set()
        self._resolver = PlaceholderMetadataResolver(vllm_config.model_config)
        # worker side
        self._info: pb.ModelInfo | None = None
        self._staged: dict[int, torch.Tensor] = {}
        self._staged_bytes = 0
        self._report = VitcacheWorkerMetadata()

    def shutdown(self) -> None:
        self._staged.clear()
        self._client.close()

    def _warn(self, message: str, *args: object) -> None:
        """A rate-limited warning: vitcache being down must not flood vLLM's log once per item."""
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            logger.warning(message, *args)

    # ---------------- scheduler side ----------------

    def _query(self, identifiers: Sequence[str]) -> None:
        """Ask vitcache (metadata only, one Fetch) about the identifiers not yet known this step."""
        unknown = [i for i in dict.fromkeys(identifiers) if i not in self._present and i not in self._absent_this_step]
        if not unknown:
            return
        try:
            found = lookup(self._client, unknown, metadata_only=True, timeout_s=self.settings.timeout_s)
        except grpc.RpcError as error:
            self._warn("vitcache lookup failed (%s): encoder inputs are computed locally", error.code())
            found = {}
        for identifier in unknown:
            if identifier in found:
                self._present[identifier] = None
                self._present.move_to_end(identifier)
            else:
                self._absent_this_step.add(identifier)
        while len(self._present) > _PRESENT_MEMO:
            self._present.popitem(last=False)

    def has_cache_item(self, identifier: str) -> bool:
        """Whether a load would succeed: for a consumer, the entry is staged on every worker."""
        if self.is_consumer:
            stage = self._stages.get(identifier)
            return stage is not None and stage.ready
        self._query([identifier])
        return identifier in self._present

    def ensure_cache_available(self, request: Request, num_computed_tokens: int) -> bool:
        """True once every entry the request will load is staged on the workers; until then the request waits and
        its entries are queued for staging. An entry that cannot be had fails the request unless vLLM can encode
        the image itself."""
        pending = [
            (index, feature)
            for index, feature in enumerate(request.mm_features)
            if feature.mm_position.offset + feature.mm_position.length > num_computed_tokens
        ]
        self._query([feature.identifier for _, feature in pending])
        if not self.is_consumer:
            return True
        request_id = request.request_id
        if request_id in self._unavailable:
            return False
        # vLLM encodes these itself, or holds them since their load (a chunked prefill asks again for each chunk)
        skip = self._encode_locally.get(request_id, set()) | self._loaded_by(request)
        waiting, to_stage = [], {}
        for index, feature in pending:
            identifier = feature.identifier
            if identifier in skip:
                continue
            stage = self._stages.get(identifier)
            if stage is not None:
                stage.requests[request_id] = request
                if not stage.ready:
                    waiting.append(feature)
            elif identifier in self._present:
                to_stage.setdefault(identifier, (index, feature))
                waiting.append(feature)
            elif not self._give_up(request, feature, "vitcache has no entry for it"):
                return False
        if not waiting:
            self._deferred_since.pop(request_id, None)
            return True
        if to_stage and not self._stage(request, list(to_stage.values())):
            return False
        now = time.monotonic()
        if now - self._deferred_since.setdefault(request_id, now) <= self.settings.stage_wait_s:
            return False
        del self._deferred_since[request_id]
        why = f"it was not staged within stage_wait_s={self.settings.stage_wait_s:g}"
        return all(self._give_up(request, feature, why) for feature in waiting)

    def _give_up(self, request: Request, feature: MultiModalFeatureSpec, why: str) -> bool:
        """vitcache cannot supply ``feature``: vLLM encodes it if the request carries the image (True), else the
        request is failed (False)."""
        stage = self._stages.get(feature.identifier)
        if stage is not None:
            self._leave(stage, request.request_id)
        if self._has_local_input(feature):
            self._encode_locally.setdefault(request.request_id, set()).add(feature.identifier)
            return True
        self._warn("failing request %s: %s needs vitcache and %s", request.request_id, feature.identifier, why)
        self._unavailable.add(request.request_id)
        return False

    def _has_local_input(self, feature: MultiModalFeatureSpec) -> bool:
        """Whether vLLM can run the encoder itself (the same test as vLLM's own ECCPUConnector)."""
        data = feature.data
        if not data:
            return False
        metadata_fields = self._resolver.fields_for(feature.modality)
        return any(value.data is not None for key, value in data.items() if key not in metadata_fields)

    def _estimate(self, request: Request, index: int) -> tuple[int, int]:
        """(tokens, bytes) of the request's item ``index``: bytes per token as the workers last reported them for
        its modality, else vLLM's encoder output width at the model's dtype."""
        feature = request.mm_features[index]
        tokens = request.get_num_encoder_embeds(index)
        per_token = self._bytes_per_token.get(feature.modality)
        if per_token is None:
            assert self._vllm_config.ec_transfer_config is not None
            widths = self._vllm_config.ec_transfer_config.mm_encoder_output_widths
            width = widths.get(feature.modality) or self._vllm_config.model_config.get_inputs_embeds_size()
            per_token = width * self._vllm_config.model_config.dtype.itemsize
        return tokens, int(tokens * per_token)

    def _stage(self, request: Request, items: list[tuple[int, MultiModalFeatureSpec]]) -> bool:
        """Queue the request's entries for staging together, or none while they would not fit in staging_bytes
        (all of a request's, so requests holding part of their entries cannot starve each other). False: the
        request was given up on (its entries could never fit)."""
        sizes = [self._estimate(request, index) for index, _ in items]
        needed = sum(nbytes for _, nbytes in sizes)
        if self._staging_bytes + needed > self.settings.staging_bytes:
            if self._staging_bytes:
                return True  # room comes back as staged entries are used
            why = f"its entries ({needed} bytes) exceed staging_bytes={self.settings.staging_bytes}"
            return all(self._give_up(request, feature, why) for _, feature in items)
        for (_, feature), (tokens, nbytes) in zip(items, sizes, strict=True):
            stage = Stage(StageItem(self._next_stage_id, feature.identifier, tokens), feature.modality, nbytes)
            stage.requests[request.request_id] = request
            self._next_stage_id += 1
            self._stages[feature.identifier] = stage
            self._stage_ids[stage.item.stage_id] = stage
            self._staging_bytes += nbytes
        return True

    def _forget(self, stage: Stage) -> None:
        """The stage leaves the scheduler's books (loaded, failed or no longer wanted)."""
        del self._stages[stage.item.identifier]
        del self._stage_ids[stage.item.stage_id]
        self._staging_bytes -= stage.nbytes

    def _leave(self, stage: Stage, request_id: str) -> None:
        """The request no longer waits on the stage; the last one to leave drops it from the workers' devices."""
        stage.requests.pop(request_id, None)
        if not stage.requests:
            self._forget(stage)
            if stage.sent:
                self._drops.append(stage.item.stage_id)

    def update_state_after_alloc(self, request: Request, index: int) -> None:
        """vLLM loads the item this step (has_cache_item said it is staged): the workers move it into
        ``encoder_cache``, which frees its staging."""
        identifier = request.mm_features[index].identifier
        stage = self._stages.get(identifier)
        if not self.is_consumer or stage is None or not stage.ready:
            return
        self._loads.append(stage.item)
        self._forget(stage)
        self._loaded_by(request).add(identifier)

    def _loaded_by(self, request: Request) -> set[str]:
        """Identifiers loaded for the request: vLLM's encoder cache keeps them until their tokens are computed,
        unless the request is preempted (vLLM frees its encoder inputs then, and they must be staged again)."""
        preemptions, loaded = self._loaded.get(request.request_id, (request.num_preemptions, set()))
        if preemptions != request.num_preemptions:
            loaded = set()
        self._loaded[request.request_id] = (request.num_preemptions, loaded)
        return loaded

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> ECConnectorMetadata:
        prefetches = [stage.item for stage in self._stages.values() if not stage.sent]
        for item in prefetches:
            self._stages[item.identifier].sent = True
        meta = VitcacheConnectorMetadata(self._drops, self._loads, prefetches)
        self._drops, self._loads = [], []
        self._absent_this_step.clear()
        return meta

    def update_connector_output(self, connector_output: ECConnectorOutput) -> None:
        meta = connector_output.ec_connector_worker_meta
        if not isinstance(meta, VitcacheWorkerMetadata):
            return
        for stage_id, nbytes in meta.staged.items():
            stage = self._stage_ids.get(stage_id)
            if stage is None:
                continue  # its requests finished meanwhile: its drop is on its way
            stage.ready = True
            self._staging_bytes += nbytes - stage.nbytes
            stage.nbytes = nbytes
            self._bytes_per_token[stage.modality] = nbytes / max(stage.item.num_tokens, 1)
        for stage_id in meta.failed:
            stage = self._stage_ids.get(stage_id)
            if stage is None:
                continue
            self._forget(stage)
            self._drops.append(stage_id)  # ranks that did stage it
            self._present.pop(stage.item.identifier, None)
            for request in stage.requests.values():
                feature = next(f for f in request.mm_features if f.identifier == stage.item.identifier)
                self._give_up(request, feature, "vitcache could not deliver it (see the workers' log)")

    def take_unavailable_requests(self) -> set[str]:
        """Requests whose encoder input vitcache could not deliver; vLLM fails them (a re-issue re-encodes)."""
        failed, self._unavailable = self._unavailable, set()
        return failed

    def request_finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        """Release the request's stages: one no other request waits on is dropped from the workers' devices."""
        for feature in request.mm_features:
            stage = self._stages.get(feature.identifier)
            if stage is not None and request.request_id in stage.requests:
                self._leave(stage, request.request_id)
        self._deferred_since.pop(request.request_id, None)
        self._encode_locally.pop(request.request_id, None)
        self._loaded.pop(request.request_id, None)
        return False, None

    def has_pending_push_work(self) -> bool:
        """Keep the engine stepping until the workers got the drops of finished requests' stages."""
        return bool(self._drops)

    # ---------------- worker side ----------------

    def _device(self) -> torch.device:
        """This worker's own device (every TP rank loads onto its own; none touches vitcache's)."""
        from vllm.platforms import current_platform

        if current_platform.is_cuda_alike():
            return torch.device(current_platform.device_type, current_platform.current_device())
        return torch.device(current_platform.device_type or "cpu")

    def _model_info(self) -> pb.ModelInfo:
        """The server's model (asked once): its family decides the layout of a digest entry."""
        if self._info is None:
            self._info = self._client.model_info(timeout=self.settings.timeout_s)
        return self._info

    def _release(self, stage_id: int) -> torch.Tensor | None:
        tensor = self._staged.pop(stage_id, None)
        if tensor is not None:
            self._staged_bytes -= tensor.nbytes
        return tensor

    def start_load_caches(self, encoder_cache: dict[str, torch.Tensor], **kwargs: Any) -> None:
        """Drop, load (staged tensors only: no network, nothing to fail), then stage the next entries."""
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, VitcacheConnectorMetadata)
        for stage_id in metadata.drops:
            self._release(stage_id)
        for item in metadata.loads:
            tensor = self._release(item.stage_id)
            if tensor is None:
                # Never expected: the scheduler loads only what every rank reported staged, and drops only what it
                # no longer loads. vLLM then raises "Encoder cache miss" rather than run on made-up values.
                logger.error("vitcache stage %d (%s) is not on this worker", item.stage_id, item.identifier)
            elif item.identifier not in encoder_cache:
                encoder_cache[item.identifier] = tensor
        if metadata.prefetches:
            self._prefetch(metadata.prefetches)

    def _prefetch(self, items: list[StageItem]) -> None:
        """Fetch the items with one Fetch onto this worker's device, reporting each as staged or failed."""
        try:
            found = lookup(
                self._client, [i.identifier for i in items], metadata_only=False, timeout_s=self.settings.timeout_s
            )
            family = self._model_info().family
        except grpc.RpcError as error:
            self._warn(
                "vitcache unreachable while staging (%s): the affected requests fail or encode locally", error.code()
            )
            found, family = {}, ""
        device = self._device()
        for item in items:
            result = found.get(item.identifier)
            tensor = self._stage_on(device, item, result, family) if result is not None else None
            if tensor is None:
                self._report.failed.add(item.stage_id)
                continue
            self._staged[item.stage_id] = tensor
            self._staged_bytes += tensor.nbytes
            self._report.staged[item.stage_id] = tensor.nbytes

    def _stage_on(
        self, device: torch.device, item: StageItem, result: EncodedImage, family: str
    ) -> torch.Tensor | None:
        """The entry in vLLM's layout on ``device``, or None (logged) when it cannot be what vLLM expects."""
        is_digest_entry = bool(result.digest) and not result.key
        try:
            blocks = vllm_layout(family, result.embeddings) if is_digest_entry else result.embeddings
        except ValueError as error:
            self._warn("vitcache entry %s: %s", item.identifier, error)
            return None
        if blocks[0].shape[0] != item.num_tokens:
            self._warn(
                "vitcache entry %s has %d tokens, vLLM expects %d", item.identifier, blocks[0].shape[0], item.num_tokens
            )
            return None
        nbytes = sum(block.nbytes for block in blocks)
        if self._staged_bytes + nbytes > self.settings.staging_bytes:
            self._warn(
                "vitcache entry %s (%d bytes) does not fit in staging_bytes=%d: raise it in ec_connector_extra_config",
                item.identifier,
                nbytes,
                self.settings.staging_bytes,
            )
            return None
        return to_device(blocks, device)

    def build_connector_worker_meta(self) -> ECConnectorWorkerMetadata | None:
        if not self._report.staged and not self._report.failed:
            return None
        report, self._report = self._report, VitcacheWorkerMetadata()
        return report

    def save_caches(self, encoder_cache: dict[str, torch.Tensor], mm_hash: str, **kwargs: Any) -> None:
        """Producer: ``Put`` what vLLM computed under vLLM's identifier (failures are logged, never raised)."""
        if not self.is_producer:
            return
        tensor = encoder_cache[mm_hash].detach().cpu()
        try:
            errors = self._client.put({mm_hash: [tensor]}, timeout=self.settings.timeout_s)
        except grpc.RpcError as error:
            self._warn("vitcache Put failed (%s): %s stays local", error.code(), mm_hash)
            return
        if errors and errors[0] is not None:
            self._warn("vitcache refused %s: %s", mm_hash, errors[0])
