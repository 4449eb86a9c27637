"""vLLM encoder-cache connector backed by vitcache (vLLM 0.33.0's ``ECConnectorBase``).

Enable it with::

    --ec-transfer-config '{"ec_connector": "VitcacheECConnector",
        "ec_connector_module_path": "vitcache.integrations.vllm", "ec_role": "ec_consumer",
        "ec_connector_extra_config": {"target": "vitcache:50051"}}'

``ec_connector_extra_config`` keys: ``target`` (host:port, or several comma-separated for a fleet),
``shm_socket`` (the server's ``--shm-socket``, same host, one target only), ``tls_ca``, ``tls_cert``, ``tls_key``,
``auth_token_file`` (paths), ``tenant``, ``timeout_s`` (default 5).

Identifiers: vLLM keys every multimodal item by ``MultiModalFeatureSpec.identifier`` (its mm_hash, or the
request's ``uuid`` verbatim). An identifier that is a vitcache digest (32 hex characters, as the EPD proxy helper
below sends) names the entry vitcache computed from the image's bytes; any other (vLLM's mm_hash is 64) names an
entry in the key space that producers fill with ``Put`` (a key can never shadow a computed entry).

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
_PRESENT_MEMO = 1 << 16  # identifiers remembered as present; vitcache may evict them, which the load path handles
_WARN_EVERY_S = 30.0


def _digest_of(identifier: str) -> bytes | None:
    return bytes.fromhex(identifier) if _DIGEST.fullmatch(identifier) else None


@dataclass(frozen=True)
class ConnectorSettings:
    """``ec_connector_extra_config``: where vitcache is and how to reach it (the client's options)."""

    targets: tuple[str, ...]
    shm_socket: str | None = None
    options: ConnectOptions = field(default_factory=ConnectOptions)
    timeout_s: float = 5.0

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
class LoadItem:
    identifier: str
    num_tokens: int
    modality: str


@dataclass
class VitcacheConnectorMetadata(ECConnectorMetadata):
    """Scheduler -> workers: the items to load this step."""

    loads: list[LoadItem] = field(default_factory=list)


@dataclass
class VitcacheWorkerMetadata(ECConnectorWorkerMetadata):
    """Workers -> scheduler: identifiers a worker could not load (evicted, or vitcache unreachable)."""

    failed: set[str] = field(default_factory=set)

    def aggregate(self, other: ECConnectorWorkerMetadata) -> ECConnectorWorkerMetadata:
        assert isinstance(other, VitcacheWorkerMetadata)
        return VitcacheWorkerMetadata(self.failed | other.failed)


class VitcacheECConnector(ECConnectorBase):
    """Encoder outputs from vitcache: consumers load them into ``encoder_cache``, producers ``Put`` theirs."""

    def __init__(self, vllm_config: VllmConfig, role: ECConnectorRole) -> None:
        super().__init__(vllm_config=vllm_config, role=role)
        assert vllm_config.ec_transfer_config is not None
        self.settings = ConnectorSettings.from_extra_config(vllm_config.ec_transfer_config.ec_connector_extra_config)
        self._client = self.settings.client()
        self._last_warning = 0.0
        # scheduler side
        self._present: OrderedDict[str, None] = OrderedDict()
        self._absent_this_step: set[str] = set()
        self._loads: dict[str, LoadItem] = {}
        self._waiting: dict[str, set[str]] = {}  # identifier -> ids of requests that load it
        self._unavailable: set[str] = set()
        self._resolver = PlaceholderMetadataResolver(vllm_config.model_config)
        # worker side
        self._info: pb.ModelInfo | None = None
        self._failed: set[str] = set()

    def shutdown(self) -> None:
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
        self._query([identifier])
        return identifier in self._present

    def ensure_cache_available(self, request: Request, num_computed_tokens: int) -> bool:
        """Batch the request's lookups into one Fetch; fail a request whose input only vitcache could supply."""
        pending = [f for f in request.mm_features if f.mm_position.offset + f.mm_position.length > num_computed_tokens]
        self._query([f.identifier for f in pending])
        if not self.is_consumer:
            return True
        for feature in pending:
            if feature.identifier not in self._present and not self._has_local_input(feature):
                self._warn(
                    "vitcache has no entry for %s and the request carries no image: failing it", feature.identifier
                )
                self._unavailable.add(request.request_id)
                return False
        return True

    def _has_local_input(self, feature: MultiModalFeatureSpec) -> bool:
        """Whether vLLM can run the encoder itself (the same test as vLLM's own ECCPUConnector)."""
        data = feature.data
        if not data:
            return False
        metadata_fields = self._resolver.fields_for(feature.modality)
        return any(value.data is not None for key, value in data.items() if key not in metadata_fields)

    def update_state_after_alloc(self, request: Request, index: int) -> None:
        feature = request.mm_features[index]
        if not self.is_consumer or not self.has_cache_item(feature.identifier):
            return
        self._loads[feature.identifier] = LoadItem(
            feature.identifier, request.get_num_encoder_embeds(index), feature.modality
        )
        self._waiting.setdefault(feature.identifier, set()).add(request.request_id)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> ECConnectorMetadata:
        meta = VitcacheConnectorMetadata(list(self._loads.values()))
        self._loads.clear()
        self._absent_this_step.clear()
        return meta

    def update_connector_output(self, connector_output: ECConnectorOutput) -> None:
        meta = connector_output.ec_connector_worker_meta
        if not isinstance(meta, VitcacheWorkerMetadata):
            return
        for identifier in meta.failed:
            self._present.pop(identifier, None)
            self._unavailable.update(self._waiting.pop(identifier, set()))

    def take_unavailable_requests(self) -> set[str]:
        """Requests whose encoder input vitcache could not deliver; vLLM fails them (a re-issue re-encodes)."""
        failed, self._unavailable = self._unavailable, set()
        return failed

    def request_finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        for feature in request.mm_features:
            waiting = self._waiting.get(feature.identifier)
            if waiting is not None:
                waiting.discard(request.request_id)
                if not waiting:
                    del self._waiting[feature.identifier]
        return False, None

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

    def _width(self, modality: str) -> int:
        """Width of a token of vLLM's encoder output, for the placeholder of an item that failed to load."""
        if self._info is not None:
            widths = [output.hidden_size for output in self._info.outputs]
            return sum(widths) if self._info.family == "qwen3_vl" else widths[0]
        assert self._vllm_config.ec_transfer_config is not None
        measured = self._vllm_config.ec_transfer_config.mm_encoder_output_widths
        return measured.get(modality) or self._vllm_config.model_config.get_inputs_embeds_size()

    def start_load_caches(self, encoder_cache: dict[str, torch.Tensor], **kwargs: Any) -> None:
        """Load this step's items with one Fetch; an item that cannot be loaded is reported, never raised."""
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, VitcacheConnectorMetadata)
        wanted = [item for item in metadata.loads if item.identifier not in encoder_cache]
        if not wanted:
            return
        device = self._device()
        try:
            found = lookup(
                self._client, [i.identifier for i in wanted], metadata_only=False, timeout_s=self.settings.timeout_s
            )
            family = self._model_info().family
        except grpc.RpcError as error:
            self._warn("vitcache unreachable while loading (%s): failing the affected requests", error.code())
            found, family = {}, ""
        for item in wanted:
            result = found.get(item.identifier)
            if result is not None:
                blocks = (
                    vllm_layout(family, result.embeddings) if result.digest and not result.key else result.embeddings
                )
                if blocks[0].shape[0] == item.num_tokens:
                    encoder_cache[item.identifier] = to_device(blocks, device)
                    continue
                self._warn(
                    "vitcache entry %s has %d tokens, vLLM expects %d",
                    item.identifier,
                    blocks[0].shape[0],
                    item.num_tokens,
                )
            # vLLM's model runner raises on a missing entry, so the step gets zeros and the scheduler fails the request.
            self._failed.add(item.identifier)
            encoder_cache[item.identifier] = torch.zeros(
                (item.num_tokens, self._width(item.modality)), dtype=self._vllm_config.model_config.dtype, device=device
            )

    def build_connector_worker_meta(self) -> ECConnectorWorkerMetadata | None:
        if not self._failed:
            return None
        meta, self._failed = VitcacheWorkerMetadata(self._failed), set()
        return meta

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
