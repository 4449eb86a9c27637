"""Vision encoders of VLM checkpoints, loaded without the language model, and their cache namespace."""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import PretrainedConfig
from transformers import initialization as hf_init
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
from transformers.video_processing_utils import BaseVideoProcessor

from vitcache.config import BatchingConfig, ModelConfig
from vitcache.models import accel
from vitcache.models.family import ModelFamily, ModelLoadError, OutputLayout
from vitcache.models.graphs import GraphedTower
from vitcache.models.preprocess import PreprocessConfig, image_grid
from vitcache.models.registry import FAMILIES, TINY_RANDOM_FAMILY
from vitcache.models.served import ServedModel
from vitcache.models.tiny import make_tiny_checkpoint
from vitcache.models.video import load_video_processor, processor_json
from vitcache.wire.tensor_codec import dtype_name

log = logging.getLogger(__name__)

# Bump when the meaning of cached outputs changes without any hashed input changing (e.g. a new output layout).
NAMESPACE_VERSION = "vitcache-namespace-v1"
# Config entries that describe where/when a config was written, not what the encoder computes.
_BOOKKEEPING_CONFIG_KEYS = frozenset({"transformers_version", "_name_or_path", "dtype", "architectures"})
TINY_RANDOM = "tiny-random"
_TINY_RANDOM_DIR = f"tiny-random-{TINY_RANDOM_FAMILY}-seed0-v1"


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder computes, without its weights: enough to validate inputs, size outputs and
    describe the model. Picklable, so a process that never touches the device can hold it."""

    family: str
    model_name: str
    dtype: torch.dtype
    device: str
    preprocess_config: PreprocessConfig
    namespace: str
    merge_size: int
    output_names: tuple[str, ...]
    output_hidden_sizes: tuple[int, ...]
    max_frames: int | None  # clips of more frames are refused
    pools_frames: bool  # a clip's frames are averaged into one set of tokens (else each frame has its own)

    @classmethod
    def of(
        cls,
        family: str,
        model_name: str,
        layout: OutputLayout,
        preprocess_config: PreprocessConfig,
        dtype: torch.dtype,
        device: torch.device,
        namespace: str,
    ) -> EncoderSpec:
        return cls(
            family,
            model_name,
            dtype,
            str(device),
            preprocess_config,
            namespace,
            layout.merge_size,
            layout.names,
            layout.hidden_sizes,
            layout.max_frames,
            layout.pools_frames,
        )

    def tokens_for(self, grid_thw: tuple[int, int, int]) -> int:
        t, h, w = grid_thw
        frames = 1 if self.pools_frames else t
        return frames * h * w // self.merge_size**2

    def validate_grid(self, grid_thw: tuple[int, int, int]) -> None:
        self.served.validate_grid(grid_thw)

    @cached_property
    def served(self) -> ServedModel:
        """This spec without torch: what a gRPC front-end process gets of it."""
        config = self.preprocess_config
        return ServedModel(
            self.family,
            self.model_name,
            dtype_name(self.dtype),
            self.device,
            self.namespace,
            self.merge_size,
            self.output_names,
            self.output_hidden_sizes,
            self.max_frames,
            config.patch_size,
            config.temporal_patch_size,
            config.patch_dim,
            config.to_json(),
            config.frame_limit,
        )


class VisionEncoder:
    """A vision tower (+ the modules its family runs after it) in eval/inference mode on one device.

    What it computes (family, dtype, output sizes, ...) is its :class:`EncoderSpec`, whose fields
    and methods read as the encoder's own (``encoder.family``, ``encoder.tokens_for(grid)``);
    how, its :class:`ModelFamily` (``encoder.model_family``).
    """

    def __init__(
        self,
        family: str,
        model_family: ModelFamily,
        model_name: str,
        module: nn.ModuleDict,
        config: PretrainedConfig,
        preprocess_config: PreprocessConfig,
        dtype: torch.dtype,
        namespace: str,
    ) -> None:
        # Keys mirror the full model's submodules under `model.`: "visual" or "vision_tower" + "mm_projector".
        self.module = module
        self.model_family = model_family
        self.device = next(module.parameters()).device
        self.acceleration = "none"  # set by load_encoder
        self.graphs: GraphedTower | None = None  # set by load_encoder for acceleration="graphs"
        self.video_processor: BaseVideoProcessor | None = None  # set by load_encoder for families with videos
        layout = model_family.output_layout(config)
        self.spec = EncoderSpec.of(family, model_name, layout, preprocess_config, dtype, self.device, namespace)

    def __getattr__(self, name: str) -> Any:
        if name == "spec":  # not set yet (during __init__ or unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.spec, name)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[list[torch.Tensor]]:
        """Runs the tower on a batch of images in one forward; per image, its outputs in `output_names` order."""
        sizes = [self.tokens_for(tuple(grid)) for grid in grid_thw.tolist()]
        outputs = self.forward_packed(pixel_values, grid_thw)
        return [list(per_image) for per_image in zip(*(output.split(sizes) for output in outputs), strict=True)]

    def forward_packed(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """As :meth:`forward`, but per output the batch's tokens in one tensor, image after image
        (``tokens_for`` each): what one copy to the host takes."""
        grids = [tuple(g) for g in grid_thw.tolist()]
        for grid in grids:
            self.validate_grid(grid)
        patch_dim = self.preprocess_config.patch_dim
        if pixel_values.shape != (sum(t * h * w for t, h, w in grids), patch_dim):
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} do not match grids {grids} x {patch_dim}")
        with torch.inference_mode():
            return self._forward(pixel_values.to(self.device, self.dtype), grid_thw, grids)

    @property
    def tower(self) -> nn.Module:
        return self.module[self.model_family.tower_name]

    def _forward(
        self, pixels: torch.Tensor, grid_thw: torch.Tensor, grids: list[tuple[int, int, int]]
    ) -> list[torch.Tensor]:
        if self.graphs is not None and (outputs := self.graphs.run(pixels, grids)) is not None:
            return outputs
        grid_thw = accel.host_to_device(grid_thw, self.device)
        # Accelerated: grid-derived metadata computed once on the CPU instead of per layer on the device.
        meta = (
            {}
            if self.acceleration == "none"
            else accel.to_device(self.model_family.batch_metadata(self.tower, grids), self.device)
        )
        return self._run_tower(pixels, grid_thw, meta)

    def _run_tower(self, pixels: torch.Tensor, grid_thw: torch.Tensor, meta: dict[str, Any]) -> list[torch.Tensor]:
        return self.model_family.run_tower(self.module, pixels, grid_thw, meta, self.preprocess_config)


def load_encoder(settings: ModelConfig, graph_max_patches: int = BatchingConfig.max_batch_patches) -> VisionEncoder:
    """Load the vision encoder of ``settings.model``: a local HF checkpoint directory (or the built-in
    "tiny-random"), on ``settings.device`` (one device), in ``settings.dtype``.

    ``settings.acceleration`` picks the forward (see vitcache.models.accel): "none" is transformers' own with SDPA,
    "varlen" one packed attention call per layer, "compile" varlen plus compiled blocks; "auto" is
    varlen where it is available (CUDA) and none elsewhere; "graphs" is compile plus CUDA graphs
    (vitcache.models.graphs) for batches of up to ``graph_max_patches`` patches, on the Qwen families. It
    is not part of the namespace: the outputs agree within the dtype's rounding.

    ``settings.warmup_image_sizes`` ((width, height) pairs) are run before returning, in batches of 1 to
    as many as ``graph_max_patches`` holds, so the CUDA graph of each such batch is captured at
    load instead of stalling forwards under load (a capture takes a warm-up forward and more).
    """
    model = settings.model
    device = _resolve_device(settings.device)
    dtype = _resolve_dtype(settings.dtype, device)
    acceleration = _resolve_acceleration(settings.acceleration, device, dtype)
    path = _tiny_random_checkpoint() if model == TINY_RANDOM else Path(model)
    if not path.is_dir():
        raise ModelLoadError(
            f"model {model!r}: no such directory; give a local Hugging Face checkpoint directory "
            f"(config.json, *.safetensors, preprocessor_config.json) or {TINY_RANDOM!r}"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model {model!r} is not a Hugging Face checkpoint directory: it has no config.json")
    family, model_family, config = _read_config(path)
    if acceleration == "graphs" and not model_family.cuda_graphs:
        log.warning("CUDA graphs do not support %s; compiling without them", family)
        acceleration = "compile"
    try:
        preprocess_config = model_family.preprocess_cls.from_pretrained(path)
        video_processor = load_video_processor(path, model_family)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the image or video processor config of {path}: {e}") from e

    namespace = xxhash.xxh3_128()
    for part in (NAMESPACE_VERSION, family, _describe(model_family, config), str(dtype), preprocess_config.to_json()):
        namespace.update(part.encode() + b"\0")
    if video_processor is not None:  # videos: every setting of the family's video processor
        namespace.update(processor_json(video_processor).encode() + b"\0")
    with ExitStack() as files:
        try:
            state = _read_vision_state(path, config, model_family, files)
        except (OSError, SafetensorError) as e:
            raise ModelLoadError(f"cannot read the vision weights of {path}: {e}") from e
        for name in sorted(state):
            tensor = state[name].contiguous()
            namespace.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
            namespace.update(tensor.reshape(-1).view(torch.uint8).numpy())
        attention = "sdpa" if acceleration == "none" else accel.VARLEN_ATTENTION
        module = _build_module(config, model_family, device, dtype, attention)
        _check_weights_fit(module, state, f"vision weights of {path} do not fit its {family} config")
        module.load_state_dict(state, strict=True)
    module.eval().requires_grad_(False)
    tower = module[model_family.tower_name]
    if acceleration != "none":
        accel.linear_patch_embed(tower)
        accel.pad_mlp_width(tower)
    if acceleration in ("compile", "graphs"):
        accel.compile_blocks(tower)
    encoder = VisionEncoder(
        family, model_family, model, module, config, preprocess_config, dtype, namespace.hexdigest()
    )
    encoder.acceleration = acceleration
    encoder.video_processor = video_processor
    if acceleration in ("compile", "graphs"):
        _warm_up(encoder)
    if acceleration == "graphs":
        encoder.graphs = GraphedTower(
            encoder._run_tower,
            model_family,
            encoder.tower,
            encoder.merge_size,
            preprocess_config.patch_dim,
            device,
            dtype,
            max_patches=graph_max_patches,
        )
    for width, height in settings.warmup_image_sizes:
        t, h, w = grid = image_grid(height, width, preprocess_config)
        for count in range(1, max(1, graph_max_patches // (t * h * w)) + 1):
            _run_blank(encoder, [grid] * count)
    return encoder


@dataclass(frozen=True)
class EncoderLoader:
    """:func:`load_encoder`'s arguments, picklable: one description of the model to load, whether
    the server loads it or hands it to an encoder process."""

    settings: ModelConfig
    graph_max_patches: int = BatchingConfig.max_batch_patches

    @property
    def device(self) -> str:
        return self.settings.device

    def on(self, device: str) -> EncoderLoader:
        """The same model on ``device``."""
        return replace(self, settings=replace(self.settings, device=device))

    def load(self) -> VisionEncoder:
        return load_encoder(self.settings, self.graph_max_patches)


def _run_blank(encoder: VisionEncoder, grids: list[tuple[int, int, int]]) -> None:
    """One forward of all-zero pixels for a batch of images of ``grids``."""
    patches = sum(t * h * w for t, h, w in grids)
    pixels = torch.zeros(patches, encoder.preprocess_config.patch_dim, device=encoder.device)
    encoder.forward(pixels, torch.tensor(grids))


def _warm_up(encoder: VisionEncoder) -> None:
    """Compiles before serving, so no request waits for it.

    Inductor guards the compiled blocks on ranges of the sequence length (around the hidden and
    MLP widths), so batches of 64 to 32k patches are run once each; past that the graphs are
    length-dynamic.
    """
    m = encoder.merge_size
    for h, w in ((4, 4), (16, 32), (32, 64), (64, 128)):
        _run_blank(encoder, [(1, h * m, w * m)])


def _resolve_acceleration(acceleration: str, device: torch.device, dtype: torch.dtype) -> str:
    # varlen attention is flash attention: CUDA, 16-bit floats only.
    available = accel.varlen_available(device) and dtype in (torch.bfloat16, torch.float16)
    if acceleration == "auto":
        return "varlen" if available else "none"
    if acceleration != "none" and not available:
        raise ModelLoadError(f"acceleration {acceleration!r} needs CUDA, bfloat16/float16 and torch's varlen_attn")
    return acceleration


def _resolve_device(device: str | torch.device) -> torch.device:
    """``device``, checked to exist here before anything is loaded onto it."""
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ModelLoadError(f"device {str(device)!r} is not a device: use cpu, cuda or cuda:N") from e
    if resolved.type == "cuda":
        # device_count does not initialise CUDA (no context), and is 0 without a driver or a visible GPU.
        count = torch.cuda.device_count()
        if count == 0:
            raise ModelLoadError(
                f"device {str(device)!r}: no CUDA GPU is visible here (no NVIDIA driver, or CUDA_VISIBLE_DEVICES "
                "hides them all); serve on the cpu device instead, or run where a GPU is"
            )
        if (resolved.index or 0) >= count:
            raise ModelLoadError(
                f"device {str(device)!r}: only {count} CUDA GPU(s) are visible (cuda:0 to cuda:{count - 1})"
            )
    return resolved


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ModelLoadError(f"dtype must be a floating point torch dtype or 'auto', got {dtype!r}")
    return resolved


def _tiny_random_checkpoint() -> Path:
    """Build the tiny-random checkpoint once per cache dir; the atomic rename makes concurrent builds safe."""
    home = Path(os.environ.get("VITCACHE_HOME") or Path.home() / ".cache" / "vitcache")
    target = home / _TINY_RANDOM_DIR
    if not target.is_dir():
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=home) as tmp:
            built = make_tiny_checkpoint(TINY_RANDOM_FAMILY, Path(tmp) / "checkpoint")
            try:
                built.rename(target)
            except OSError:
                if not target.is_dir():  # not a lost race with another builder
                    raise
    return target


def _read_config(path: Path) -> tuple[str, ModelFamily, PretrainedConfig]:
    """(model_type, its family, the config) of the checkpoint at ``path``, read as transformers' AutoConfig does."""
    try:
        config_dict, unused = PretrainedConfig.get_config_dict(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the model config of {path}: {e}") from e
    family = config_dict.get("model_type")
    if family not in FAMILIES:
        raise ModelLoadError(
            f"unsupported model_type {family!r} in {path / 'config.json'}, expected one of {tuple(FAMILIES)}"
        )
    model_family = FAMILIES[family]
    try:
        return family, model_family, model_family.config_cls.from_dict(config_dict, **unused)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the model config of {path}: {e}") from e


def _describe(model_family: ModelFamily, config: PretrainedConfig) -> str:
    """Canonical JSON of every config value the encoder's computation depends on."""
    vision = {k: v for k, v in config.vision_config.to_dict().items() if k not in _BOOKKEEPING_CONFIG_KEYS}
    return json.dumps({"vision_config": vision, **model_family.describe(config)}, sort_keys=True)


def _weight_map(path: Path) -> dict[str, str]:
    """Checkpoint tensor name -> safetensors file, from the index when sharded (no LLM shard is opened)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = path / "model.safetensors"
    if not single.is_file():
        raise ModelLoadError(
            f"{path} has no safetensors weights (model.safetensors or model.safetensors.index.json), the only "
            "format read: save the checkpoint with save_pretrained(..., safe_serialization=True)"
        )
    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single.name)


def _read_vision_state(
    path: Path, config: PretrainedConfig, model_family: ModelFamily, files: ExitStack
) -> dict[str, torch.Tensor]:
    """The encoder's CPU state dict, keyed as the full model's parameters minus "model.".

    Checkpoint layouts differ (Qwen2/2.5-VL hub files use "visual.", transformers v5 "model.visual.", Kimi's
    original files a fused, RoPE-permuted qkv): keys are mapped with the same conversion rules transformers'
    `from_pretrained` applies, taken from the full model instantiated on the meta device (no memory, no init).
    """
    weight_map = _weight_map(path)
    with torch.device("meta"), hf_init.no_init_weights():
        full_model = model_family.model_cls._from_config(copy.deepcopy(config))
    transforms = get_model_conversion_mapping(full_model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    converter_of = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    meta_state = full_model.state_dict()

    handles = {}

    def loader(key: str) -> Callable[[], torch.Tensor]:
        file = weight_map[key]
        if file not in handles:
            handles[file] = files.enter_context(safe_open(path / file, framework="pt"))
        return partial(handles[file].get_tensor, key)

    state: dict[str, torch.Tensor] = {}
    pending: dict[str, WeightConverter] = {}
    prefixes = model_family.checkpoint_prefixes
    vision_keys = sorted((k for k in weight_map if k.startswith(prefixes)), key=dot_natural_key)
    if not vision_keys:
        raise ModelLoadError(
            f"checkpoint {path} has no vision weights (no tensor under {', '.join(prefixes)}): is it "
            f"a complete {config.model_type} checkpoint, as its config.json says?"
        )
    for key in vision_keys:
        target, pattern = rename_source_key(key, renamings, converters, full_model.base_model_prefix, meta_state)
        if pattern is None:
            state[target] = loader(key)()
        else:  # one checkpoint tensor feeds several parameters (Kimi's wqkv)
            converter = pending.setdefault(target, copy.deepcopy(converter_of[pattern]))
            converter.add_tensor(target, key, pattern, loader(key))
    for target, converter in pending.items():
        try:
            converted = converter.convert(target, model=full_model, config=full_model.config)
        except Exception as e:
            raise ModelLoadError(f"cannot convert checkpoint tensors for {target!r}: {e}") from e
        state.update({name: value[0] if isinstance(value, list) else value for name, value in converted.items()})
    prefix = f"{full_model.base_model_prefix}."
    return {name.removeprefix(prefix): tensor for name, tensor in state.items()}


def _check_weights_fit(module: nn.Module, state: dict[str, torch.Tensor], context: str) -> None:
    """Strict loading's checks, told in a line: how many keys are missing, unexpected or of another shape,
    and the first few of each (a wrong checkpoint misses hundreds)."""
    expected = module.state_dict()
    problems = {
        "missing": sorted(expected.keys() - state.keys(), key=dot_natural_key),
        "unexpected": sorted(state.keys() - expected.keys(), key=dot_natural_key),
        "of another shape": sorted(
            (k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape), key=dot_natural_key
        ),
    }
    found = [
        f"{len(keys)} tensor(s) {kind} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        for kind, keys in problems.items()
        if keys
    ]
    if found:
        raise ModelLoadError(f"{context}: {'; '.join(found)}")


def _build_module(
    config: PretrainedConfig, model_family: ModelFamily, device: torch.device, dtype: torch.dtype, attention: str
) -> nn.ModuleDict:
    """Allocate the encoder on `device` without random init: every parameter is then loaded from the checkpoint."""
    with torch.device(device), hf_init.no_init_weights():
        tower = model_family.vision_cls._from_config(config.vision_config, dtype=dtype, attn_implementation="sdpa")
        if attention != "sdpa":
            # Set after construction: transformers' constructor check would look for a flash-attn package
            # for any name containing "flash", and the name must contain it for the towers to pass cu_seqlens.
            tower.config._attn_implementation_internal = attention
        modules = {model_family.tower_name: tower, **model_family.extra_modules(config, dtype)}
    return nn.ModuleDict(modules)
