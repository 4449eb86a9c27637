"""Every setting of a vitcache server, declared once: default, unit, bounds, help, flag and env var.

A tree of frozen dataclasses along the flow of an image (model, encoder, batching, limits, cache
tiers, transport, security, metrics) under :class:`VitcacheConfig`. ``vitcache serve``'s flags,
their ``VITCACHE_<FLAG>`` environment variables and ``--help`` are made from it
(``vitcache.server.cli``); tests/test_config.py holds the README's flags table to it;
:func:`vitcache.build.build_engine` and the server read it. Bounds are checked here, when a group
is made, so a library user's mistake reads like an operator's.

No torch or transformers here: ``vitcache --help`` builds its parser from this module.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from vitcache.errors import ConfigError

_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def byte_size(text: str) -> int:
    """'2GiB', '512MiB', '1.5G', '1000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]i?)?b?\s*", text.lower())
    if not match:
        raise ValueError(f"not a byte size: {text!r} (try 512MiB or 2GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def image_size(text: str) -> tuple[int, int]:
    """WIDTHxHEIGHT -> (width, height)."""
    width, _, height = text.lower().partition("x")
    try:
        size = (int(width), int(height))
    except ValueError:
        raise ValueError(f"not WIDTHxHEIGHT: {text!r}") from None
    if min(size) < 1:
        raise ValueError(f"image size must be positive: {text!r}")
    return size


def image_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """'448x448,1344x1344' -> ((448, 448), (1344, 1344)); '' -> ()."""
    return tuple(image_size(size) for size in text.split(",") if size.strip())


def switch(text: str) -> bool:
    """A boolean flag's environment value: 1/true/yes/on or 0/false/no/off."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("not a boolean (1, true, yes, on or 0, false, no, off)")


#: A Setting's flag_default when the command's default is the library's.
_LIBRARY_DEFAULT: Any = object()


@dataclass(frozen=True)
class Setting:
    """What a config field says about itself to the command line and to the bounds check.

    The flag's value is in ``unit`` (shown by --help; a byte size's default names its own); ``per``
    flag units make one of the field's (1000 for a flag in ms of a field in seconds); bounds are in
    the flag's unit. ``parse`` reads the flag's text (int, float, byte_size, ...; None: a boolean
    switch); ``choices`` maps the flag's words to field values; ``zero_is_none``: the flag's 0 is the
    field's None (off). ``flag_default`` is the command's default where it differs from the library's
    (metrics are on for ``vitcache serve``, off when embedded).
    """

    help: str
    flag: str = ""  # set from the field's name by settings_of() unless given
    parse: Callable[[str], Any] | None = str
    unit: str = ""
    per: int = 1
    minimum: float | None = None
    maximum: float | None = None
    choices: dict[str, Any] | None = None
    zero_is_none: bool = False
    flag_default: Any = _LIBRARY_DEFAULT
    shown_default: str = ""  # the default as --help and the README write it, where the value would not do

    @property
    def env_var(self) -> str:
        return "VITCACHE_" + self.flag.removeprefix("--").replace("-", "_").upper()

    def command_default(self, library_default: Any) -> Any:
        """The field's value when neither the flag nor its environment variable is given."""
        return library_default if self.flag_default is _LIBRARY_DEFAULT else self.flag_default

    def default_text(self, library_default: Any) -> str:
        """The command's default as --help and the README's flags table write it."""
        default = self.to_flag(self.command_default(library_default))
        return self.shown_default or ("none" if default is None else str(default).lower())

    def from_flag(self, value: Any) -> Any:
        """The field's value for the flag's parsed ``value``."""
        if self.choices is not None:
            return self.choices[value]
        if self.zero_is_none and not value:
            return None
        return value / self.per if self.per != 1 and value is not None else value

    def to_flag(self, value: Any) -> Any:
        """The flag's value (in its unit) of the field's ``value``."""
        if self.choices is not None:
            return next(word for word, choice in self.choices.items() if choice == value)
        if self.zero_is_none and value is None:
            return 0
        if self.per != 1 and value is not None:
            value = value * self.per
            return int(value) if float(value).is_integer() else value
        return value

    def problem(self, value: Any) -> str | None:
        """What is wrong with the field's ``value`` (out of bounds, not a choice), or None."""
        if value is None and (self.zero_is_none or self.choices is None):
            return None
        if self.choices is not None:
            return None if value in self.choices.values() else f"not one of {', '.join(self.choices)}"
        shown = self.to_flag(value)
        if self.minimum is not None and shown < self.minimum:
            return f"must be at least {self.minimum:g}"
        if self.maximum is not None and shown > self.maximum:
            return f"must be at most {self.maximum:g}"
        return None


def setting(default: Any, help: str, **meta: Any) -> Any:
    """A config field: its default and its :class:`Setting` (``flag`` defaults to ``--field-name``)."""
    return field(default=default, metadata={"setting": Setting(help, **meta)})


def byte_setting(default: str, help: str, minimum: int) -> Any:
    """A size in bytes; its default written as the flag takes it ("512MiB")."""
    return setting(byte_size(default), help, parse=byte_size, minimum=minimum, shown_default=default)


class _Group:
    """A group of settings: checks its fields' bounds and choices when made."""

    def __post_init__(self) -> None:
        for name, meta, _ in settings_of(type(self)):
            value = getattr(self, name)
            if problem := meta.problem(value):
                shown = meta.to_flag(value) if meta.choices is None else repr(value)
                raise ConfigError(f"{meta.flag}={shown}: {problem}")


ACCELERATIONS = ("auto", "none", "varlen", "compile", "graphs")


@dataclass(frozen=True)
class ModelConfig(_Group):
    """Which vision tower to load, where and how (what load_encoder and an encoder process need)."""

    model: str = setting("tiny-random", "HF checkpoint directory, or the built-in tiny-random")
    device: str = setting(
        "cpu", "cpu, cuda:N, a list such as cuda:0,cuda:1, or cuda / all: one encoder process per GPU, all visible GPUs"
    )
    dtype: str | None = setting(
        None, "bfloat16, float16, float32 (default: bf16 on cuda, fp32 on cpu)", shown_default="auto"
    )
    acceleration: str = setting(
        "auto",
        "vision forward: transformers' (none), packed varlen attention, varlen + torch.compile, "
        "or compile + CUDA graphs per batch size (Qwen families)",
        choices={name: name for name in ACCELERATIONS},
    )
    warmup_image_sizes: tuple[tuple[int, int], ...] = setting(
        (),
        "WIDTHxHEIGHT,...: at start-up, run batches of 1 to --max-batch-patches of images of these sizes, "
        "so their CUDA graphs (--acceleration graphs) are captured before serving instead of under load",
        parse=image_sizes,
        shown_default="none",
    )


@dataclass(frozen=True)
class EncoderConfig(_Group):
    """The encoder processes that own the devices."""

    encoder_process: bool | None = setting(
        None,
        "decode, preprocess and forward in a child process that owns the device (auto: on for cuda)",
        choices={"auto": None, "on": True, "off": False},
    )
    encoder_ring_bytes: int = byte_setting(
        "512MiB",
        "shared memory the encoder process returns embeddings through (more travel by pipe when full)",
        minimum=0,
    )
    encoder_restart_backoff_s: float = setting(
        1.0,
        "wait before a dead encoder process is started again (doubles while starts fail, up to 60 s)",
        flag="--encoder-restart-backoff-ms",
        parse=float,
        unit="ms",
        per=1000,
        minimum=0,
    )

    def uses_process(self, device: str) -> bool:
        """Whether the model on ``device`` (``--device``) runs in encoder processes."""
        return device.startswith(("cuda", "all")) if self.encoder_process is None else self.encoder_process


@dataclass(frozen=True)
class BatchingConfig(_Group):
    """How misses are packed into vision forwards."""

    max_batch_patches: int = setting(16384, "patches in one vision forward", parse=int, minimum=1)
    max_batch_wait_s: float = setting(
        0.002, "how long a batch waits to fill", flag="--max-batch-wait-ms", parse=float, unit="ms", per=1000, minimum=0
    )
    preprocess_workers: int = setting(4, "threads that decode and preprocess", parse=int, minimum=1)


@dataclass(frozen=True)
class LimitsConfig(_Group):
    """What one request, image or Put may cost, and how much work may be queued."""

    max_image_bytes: int = byte_setting("32MiB", "largest encoded image accepted", minimum=1)
    max_image_pixels: int = setting(64 << 20, "largest width*height accepted", parse=int, unit="pixels", minimum=1)
    max_decoded_pixels_in_flight: int = setting(
        128 << 20,
        "width*height of all images and video frames being decoded and preprocessed at once (about 16 bytes each); "
        "more wait, a larger image fails with RESOURCE_EXHAUSTED",
        parse=int,
        unit="pixels",
        minimum=1,
    )
    max_images_per_request: int = setting(
        256, "images (digests, pixel-batch grids) in one request", parse=int, minimum=1
    )
    max_request_bytes: int = byte_setting("256MiB", "largest gRPC message accepted", minimum=1)
    max_put_bytes: int = byte_setting("256MiB", "tensor bytes of one Put entry", minimum=1)
    max_queued_images: int = setting(
        1024,
        "misses being resolved at once (L2 lookup, fleet lock wait, preprocessing, forward); "
        "beyond it images fail with RESOURCE_EXHAUSTED",
        parse=int,
        minimum=1,
    )
    max_video_bytes: int = byte_setting("128MiB", "largest encoded video accepted", minimum=1)
    max_video_seconds: float = setting(
        3600.0,
        "longest video accepted (its header's duration)",
        parse=float,
        unit="s",
        minimum=0.001,
        shown_default="3600",
    )
    max_video_frames: int = setting(768, "frames sampled from one video", parse=int, minimum=1)
    max_video_frame_pixels: int = setting(
        3840 * 2160, "width*height of a video frame", parse=int, unit="pixels", minimum=1
    )
    max_cached_video_bytes: int = byte_setting(
        "256MiB", "a video entry larger than this is computed and returned, not cached", minimum=0
    )
    video_decoder: str = setting(
        "cpu",
        "where video files decode: cpu = FFmpeg's software decoders (measured faster: docs/benchmarks.md), "
        "cuda = NVDEC on the encoder's GPU (start-up fails without it), auto = cuda where PyAV can open NVDEC "
        "on the encoder's device, else cpu",
        choices={name: name for name in ("auto", "cpu", "cuda")},
    )


@dataclass(frozen=True)
class CacheConfig(_Group):
    """The tiers: the in-process L1, the shared Redis L2 and the fleet lock on it."""

    l1_bytes: int = byte_setting("2GiB", "in-process cache size", minimum=0)
    redis_url: str | None = setting(None, "redis://host:port/db for the shared L2; none = L1 only")
    redis_ttl_s: int | None = setting(
        None,
        "seconds an L2 entry lives (0 = no expiry)",
        flag="--redis-ttl",
        parse=int,
        unit="s",
        minimum=0,
        zero_is_none=True,
    )
    redis_timeout_s: float = setting(
        0.5, "bound on each Redis call", flag="--redis-timeout-ms", parse=float, unit="ms", per=1000, minimum=1
    )
    redis_cluster: bool = setting(False, "--redis-url names one seed node of a Redis Cluster", parse=None)
    fleet_lock_ttl_s: float | None = setting(
        10.0,
        "how long replicas sharing L2 wait for the one computing an image before computing it too (0 = no lock)",
        flag="--fleet-lock-ttl-ms",
        parse=float,
        unit="ms",
        per=1000,
        minimum=0,
        zero_is_none=True,
    )


@dataclass(frozen=True)
class TransportConfig(_Group):
    """Where clients reach the server: gRPC, and the same-host shared-memory socket."""

    host: str = setting("127.0.0.1", "address the gRPC server listens on")
    port: int = setting(50051, "gRPC port; 0 picks a free port", parse=int, minimum=0, maximum=65535)
    frontends: int = setting(
        0,
        "gRPC front-end processes sharing --port, for when one process cannot move the results (about 450 "
        "img/s of 1.8 MB on an H200 host): try one per GPU; 0 serves gRPC in the engine's process",
        parse=int,
        minimum=0,
        maximum=64,
    )
    shm_socket: str | None = setting(
        None, "Unix socket for same-host clients that take results in shared memory (its directory: 0700)"
    )
    shm_arena_bytes: int = byte_setting("256MiB", "shared memory one shm client connection may hold", minimum=1)


@dataclass(frozen=True)
class SecurityConfig(_Group):
    """TLS, tokens and tenants, keyed digests."""

    tls_cert: str | None = setting(None, "PEM certificate chain: serve TLS")
    tls_key: str | None = setting(None, "PEM private key of --tls-cert")
    tls_client_ca: str | None = setting(None, "PEM CA: require client certificates it signed (mutual TLS)")
    auth_token_file: str | None = setting(None, "lines 'TOKEN [TENANT]': require 'authorization: Bearer'")
    metrics_token_file: str | None = setting(
        None,
        "one token a line: require 'Authorization: Bearer' for /metrics and /api/stats "
        "(unbound --auth-token-file tokens may read them too)",
    )
    digest_key_file: str | None = setting(None, "secret shared with trusted clients: keyed digests")

    def __post_init__(self) -> None:
        super().__post_init__()
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")


@dataclass(frozen=True)
class MetricsConfig(_Group):
    """/metrics, /api/stats and the dashboard."""

    metrics_host: str = setting("127.0.0.1", "address of /metrics, /api/stats and the dashboard")
    metrics_port: int | None = setting(
        None,
        "port of /metrics and the dashboard; 0 picks one",
        parse=int,
        minimum=0,
        maximum=65535,
        flag_default=9400,
    )


@dataclass(frozen=True)
class VitcacheConfig:
    """The whole tree. ``VitcacheConfig.of(redis_url=..., max_batch_wait_s=0.5)`` sets settings by
    name, whatever their group (every setting's name is unique in the tree)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @classmethod
    def of(cls, **values: Any) -> VitcacheConfig:
        groups: dict[str, dict[str, Any]] = {}
        for group_name, group_type in groups_of(cls):
            names = {f.name for f in fields(group_type)}
            groups[group_name] = {name: values.pop(name) for name in list(values) if name in names}
        if values:
            raise TypeError(f"no such setting: {', '.join(sorted(values))}")
        return cls(**{name: group_type(**groups[name]) for name, group_type in groups_of(cls)})


def groups_of(tree: type[VitcacheConfig] = VitcacheConfig) -> list[tuple[str, type]]:
    """(name, group class) of each group of the tree, in flow order."""
    return [(f.name, f.default_factory) for f in fields(tree)]  # type: ignore[misc]


def settings_of(group: type) -> list[tuple[str, Setting, Any]]:
    """(field name, its Setting, its library default) of each field of a group class."""
    out = []
    for f in fields(group):
        meta = f.metadata["setting"]
        out.append((f.name, meta if meta.flag else replace(meta, flag="--" + f.name.replace("_", "-")), f.default))
    return out
