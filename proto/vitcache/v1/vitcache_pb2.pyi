from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_UNSPECIFIED: _ClassVar[Source]
    L1: _ClassVar[Source]
    L2: _ClassVar[Source]
    COMPUTED: _ClassVar[Source]
SOURCE_UNSPECIFIED: Source
L1: Source
L2: Source
COMPUTED: Source

class Image(_message.Message):
    __slots__ = ("encoded", "raw", "digest", "video")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    digest: bytes
    video: Video
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ..., digest: _Optional[bytes] = ..., video: _Optional[_Union[Video, _Mapping]] = ...) -> None: ...

class Video(_message.Message):
    __slots__ = ("encoded", "raw", "sampling")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawVideo
    sampling: VideoSampling
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawVideo, _Mapping]] = ..., sampling: _Optional[_Union[VideoSampling, _Mapping]] = ...) -> None: ...

class RawVideo(_message.Message):
    __slots__ = ("rgb", "frames", "height", "width", "timestamps")
    RGB_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    rgb: bytes
    frames: int
    height: int
    width: int
    timestamps: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, rgb: _Optional[bytes] = ..., frames: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., timestamps: _Optional[_Iterable[float]] = ...) -> None: ...

class VideoSampling(_message.Message):
    __slots__ = ("fps", "num_frames", "min_pixels", "max_pixels")
    FPS_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MIN_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    fps: float
    num_frames: int
    min_pixels: int
    max_pixels: int
    def __init__(self, fps: _Optional[float] = ..., num_frames: _Optional[int] = ..., min_pixels: _Optional[int] = ..., max_pixels: _Optional[int] = ...) -> None: ...

class VideoTiming(_message.Message):
    __slots__ = ("frames", "sampled_fps", "second_per_grid_ts", "timestamps")
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FPS_FIELD_NUMBER: _ClassVar[int]
    SECOND_PER_GRID_TS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    frames: int
    sampled_fps: float
    second_per_grid_ts: float
    timestamps: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, frames: _Optional[int] = ..., sampled_fps: _Optional[float] = ..., second_per_grid_ts: _Optional[float] = ..., timestamps: _Optional[_Iterable[float]] = ...) -> None: ...

class RawImage(_message.Message):
    __slots__ = ("rgb", "height", "width")
    RGB_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    rgb: bytes
    height: int
    width: int
    def __init__(self, rgb: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PixelBatch(_message.Message):
    __slots__ = ("pixel_values", "image_grid_thw")
    PIXEL_VALUES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_GRID_THW_FIELD_NUMBER: _ClassVar[int]
    pixel_values: Tensor
    image_grid_thw: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, pixel_values: _Optional[_Union[Tensor, _Mapping]] = ..., image_grid_thw: _Optional[_Iterable[int]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("images", "pixels")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    pixels: PixelBatch
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., pixels: _Optional[_Union[PixelBatch, _Mapping]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("digests", "keys", "metadata_only")
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    METADATA_ONLY_FIELD_NUMBER: _ClassVar[int]
    digests: _containers.RepeatedScalarFieldContainer[bytes]
    keys: _containers.RepeatedScalarFieldContainer[str]
    metadata_only: bool
    def __init__(self, digests: _Optional[_Iterable[bytes]] = ..., keys: _Optional[_Iterable[str]] = ..., metadata_only: _Optional[bool] = ...) -> None: ...

class PutItem(_message.Message):
    __slots__ = ("key", "grid_thw", "embeddings")
    KEY_FIELD_NUMBER: _ClassVar[int]
    GRID_THW_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    key: str
    grid_thw: _containers.RepeatedScalarFieldContainer[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, key: _Optional[str] = ..., grid_thw: _Optional[_Iterable[int]] = ..., embeddings: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[PutItem]
    def __init__(self, items: _Optional[_Iterable[_Union[PutItem, _Mapping]]] = ...) -> None: ...

class PutResult(_message.Message):
    __slots__ = ("index", "error_code", "error_message")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    index: int
    error_code: int
    error_message: str
    def __init__(self, index: _Optional[int] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PutResult]
    def __init__(self, results: _Optional[_Iterable[_Union[PutResult, _Mapping]]] = ...) -> None: ...

class ImageResult(_message.Message):
    __slots__ = ("index", "digest", "embeddings", "grid_thw", "source", "error_code", "error_message", "key", "video", "not_cached")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    GRID_THW_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    NOT_CACHED_FIELD_NUMBER: _ClassVar[int]
    index: int
    digest: bytes
    embeddings: _containers.RepeatedCompositeFieldContainer[Tensor]
    grid_thw: _containers.RepeatedScalarFieldContainer[int]
    source: Source
    error_code: int
    error_message: str
    key: str
    video: VideoTiming
    not_cached: bool
    def __init__(self, index: _Optional[int] = ..., digest: _Optional[bytes] = ..., embeddings: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., grid_thw: _Optional[_Iterable[int]] = ..., source: _Optional[_Union[Source, str]] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ..., key: _Optional[str] = ..., video: _Optional[_Union[VideoTiming, _Mapping]] = ..., not_cached: _Optional[bool] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Stats(_message.Message):
    __slots__ = ("l1_hits", "l2_hits", "misses", "images_computed", "l1_entries", "l1_bytes", "redis_connected", "l1_capacity_bytes", "l1_evictions", "errors", "batches", "single_flight_joins", "l2_errors", "l2_corrupt", "uptime_seconds", "oom_splits", "not_found", "overloaded", "deadline_expired", "fleet_lock_waits", "puts", "encoders", "tenant_only", "tenant", "videos")
    L1_HITS_FIELD_NUMBER: _ClassVar[int]
    L2_HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    IMAGES_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    L1_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    L1_BYTES_FIELD_NUMBER: _ClassVar[int]
    REDIS_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    L1_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    L1_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    SINGLE_FLIGHT_JOINS_FIELD_NUMBER: _ClassVar[int]
    L2_ERRORS_FIELD_NUMBER: _ClassVar[int]
    L2_CORRUPT_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OOM_SPLITS_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    OVERLOADED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    FLEET_LOCK_WAITS_FIELD_NUMBER: _ClassVar[int]
    PUTS_FIELD_NUMBER: _ClassVar[int]
    ENCODERS_FIELD_NUMBER: _ClassVar[int]
    TENANT_ONLY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    VIDEOS_FIELD_NUMBER: _ClassVar[int]
    l1_hits: int
    l2_hits: int
    misses: int
    images_computed: int
    l1_entries: int
    l1_bytes: int
    redis_connected: bool
    l1_capacity_bytes: int
    l1_evictions: int
    errors: int
    batches: int
    single_flight_joins: int
    l2_errors: int
    l2_corrupt: int
    uptime_seconds: float
    oom_splits: int
    not_found: int
    overloaded: int
    deadline_expired: int
    fleet_lock_waits: int
    puts: int
    encoders: _containers.RepeatedCompositeFieldContainer[EncoderStats]
    tenant_only: bool
    tenant: str
    videos: VideoStats
    def __init__(self, l1_hits: _Optional[int] = ..., l2_hits: _Optional[int] = ..., misses: _Optional[int] = ..., images_computed: _Optional[int] = ..., l1_entries: _Optional[int] = ..., l1_bytes: _Optional[int] = ..., redis_connected: _Optional[bool] = ..., l1_capacity_bytes: _Optional[int] = ..., l1_evictions: _Optional[int] = ..., errors: _Optional[int] = ..., batches: _Optional[int] = ..., single_flight_joins: _Optional[int] = ..., l2_errors: _Optional[int] = ..., l2_corrupt: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., oom_splits: _Optional[int] = ..., not_found: _Optional[int] = ..., overloaded: _Optional[int] = ..., deadline_expired: _Optional[int] = ..., fleet_lock_waits: _Optional[int] = ..., puts: _Optional[int] = ..., encoders: _Optional[_Iterable[_Union[EncoderStats, _Mapping]]] = ..., tenant_only: _Optional[bool] = ..., tenant: _Optional[str] = ..., videos: _Optional[_Union[VideoStats, _Mapping]] = ...) -> None: ...

class VideoStats(_message.Message):
    __slots__ = ("l1_hits", "l2_hits", "misses", "errors", "not_found", "tokens")
    L1_HITS_FIELD_NUMBER: _ClassVar[int]
    L2_HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    l1_hits: int
    l2_hits: int
    misses: int
    errors: int
    not_found: int
    tokens: int
    def __init__(self, l1_hits: _Optional[int] = ..., l2_hits: _Optional[int] = ..., misses: _Optional[int] = ..., errors: _Optional[int] = ..., not_found: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class EncoderStats(_message.Message):
    __slots__ = ("device", "alive", "in_flight", "restarts", "batches", "images", "patches", "device_seconds", "memory_allocated", "memory_reserved")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PATCHES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_ALLOCATED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_RESERVED_FIELD_NUMBER: _ClassVar[int]
    device: str
    alive: bool
    in_flight: int
    restarts: int
    batches: int
    images: int
    patches: int
    device_seconds: float
    memory_allocated: int
    memory_reserved: int
    def __init__(self, device: _Optional[str] = ..., alive: _Optional[bool] = ..., in_flight: _Optional[int] = ..., restarts: _Optional[int] = ..., batches: _Optional[int] = ..., images: _Optional[int] = ..., patches: _Optional[int] = ..., device_seconds: _Optional[float] = ..., memory_allocated: _Optional[int] = ..., memory_reserved: _Optional[int] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OutputSpec(_message.Message):
    __slots__ = ("name", "hidden_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    hidden_size: int
    def __init__(self, name: _Optional[str] = ..., hidden_size: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("family", "model", "dtype", "outputs", "namespace", "patch_size", "temporal_patch_size", "merge_size", "patch_dim", "device", "preprocess_config_json")
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TEMPORAL_PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MERGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PATCH_DIM_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    family: str
    model: str
    dtype: str
    outputs: _containers.RepeatedCompositeFieldContainer[OutputSpec]
    namespace: str
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    patch_dim: int
    device: str
    preprocess_config_json: str
    def __init__(self, family: _Optional[str] = ..., model: _Optional[str] = ..., dtype: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[OutputSpec, _Mapping]]] = ..., namespace: _Optional[str] = ..., patch_size: _Optional[int] = ..., temporal_patch_size: _Optional[int] = ..., merge_size: _Optional[int] = ..., patch_dim: _Optional[int] = ..., device: _Optional[str] = ..., preprocess_config_json: _Optional[str] = ...) -> None: ...
