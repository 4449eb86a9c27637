import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from vitcache.config import ModelConfig
from vitcache.encode.decode import DecodeLimits, decode_image
from vitcache.models.loading import ModelLoadError, VisionEncoder, load_encoder
from vitcache.models.preprocess import preprocess
from vitcache.models.registry import FAMILIES
from vitcache.models.tiny import make_tiny_checkpoint

VISION_PREFIXES = (
    "visual.",
    "model.visual.",
    "vision_tower.",
    "model.vision_tower.",
    "mm_projector.",
    "model.mm_projector.",
)
# Three images of different sizes; (12, 20) spans several partial 8x8 windows of Qwen2.5-VL's window attention.
GRIDS = [(1, 4, 6), (1, 12, 20), (1, 2, 10)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: make_tiny_checkpoint(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def encoders(checkpoints) -> dict[str, VisionEncoder]:
    return {family: load_encoder(ModelConfig(str(path))) for family, path in checkpoints.items()}


def batch(encoder: VisionEncoder, grids=GRIDS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    grid_thw = torch.tensor(grids)
    generator = torch.Generator().manual_seed(seed)
    rows = int(grid_thw.prod(-1).sum())
    return torch.randn(rows, encoder.preprocess_config.patch_dim, generator=generator), grid_thw


def copy_checkpoint(source: Path, target: Path) -> Path:
    return Path(shutil.copytree(source, target))


def vision_keys(path: Path) -> list[str]:
    return sorted(k for k in load_file(path / "model.safetensors") if k.startswith(VISION_PREFIXES))


def rewrite_weights(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def assert_outputs_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # Same kernels on the same inputs; the tolerance only absorbs BLAS blocking changing with the row count.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_matches_transformers_full_model(family, checkpoints, encoders):
    encoder = encoders[family]
    full = AutoModelForImageTextToText.from_pretrained(checkpoints[family]).eval()
    pixel_values, grid_thw = batch(encoder)

    outputs = encoder.forward(pixel_values, grid_thw)

    # Kimi's processor hands the model (patches, 3, p, p); ours is the same memory, flattened.
    patch = encoder.preprocess_config.patch_size
    hf_pixels = pixel_values.view(-1, 3, patch, patch) if family == "kimi_k25" else pixel_values
    with torch.no_grad():
        features = full.model.get_image_features(hf_pixels, grid_thw)
    expected = [features.pooler_output, *getattr(features, "deepstack_features", ())]
    assert len(encoder.output_names) == len(expected) == len(encoder.output_hidden_sizes)
    if family == "qwen3_vl":
        assert encoder.output_names == ("merged", "deepstack_0", "deepstack_1")
    assert len(outputs) == len(GRIDS)
    for image, grid in zip(outputs, GRIDS, strict=True):
        assert [tuple(o.shape) for o in image] == [(encoder.tokens_for(grid), h) for h in encoder.output_hidden_sizes]
    for i, image in enumerate(outputs):
        for output, per_image in zip(image, expected, strict=True):
            assert output.dtype == torch.float32 and output.device == encoder.device
            assert_outputs_close(output, per_image[i])

    # The weights are the checkpoint's, as transformers itself loads them (incl. Kimi's fused-qkv conversion).
    for name, module in encoder.module.items():
        reference = full.model.get_submodule(name).state_dict()
        loaded = module.state_dict()
        assert loaded.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(loaded[key], reference[key], rtol=0, atol=0)


def test_parameters_are_the_checkpoint_tensors(checkpoints, encoders):
    tensors = load_file(checkpoints["qwen2_5_vl"] / "model.safetensors")
    loaded = encoders["qwen2_5_vl"].module["visual"].state_dict()
    assert {f"visual.{k}" for k in loaded} == {k for k in tensors if k.startswith("visual.")}
    for key, value in loaded.items():
        torch.testing.assert_close(value, tensors[f"visual.{key}"], rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_split_equals_single_images(family, encoders):
    encoder = encoders[family]
    pixel_values, grid_thw = batch(encoder)
    together = encoder.forward(pixel_values, grid_thw)
    start = 0
    for i, (t, h, w) in enumerate(GRIDS):
        alone = encoder.forward(pixel_values[start : start + t * h * w], grid_thw[i : i + 1])
        start += t * h * w
        assert len(alone) == 1
        for a, b in zip(alone[0], together[i], strict=True):
            assert_outputs_close(a, b)


def test_end_to_end_from_encoded_image(encoders):
    encoder = encoders["qwen2_5_vl"]
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8)).save(buf, "PNG")
    pixel_values, grid = preprocess(decode_image(buf.getvalue(), DecodeLimits()), encoder.preprocess_config)
    encoder.validate_grid(grid)
    (merged,) = encoder.forward(pixel_values, torch.tensor([grid]))[0]
    assert merged.shape == (encoder.tokens_for(grid), encoder.output_hidden_sizes[0])
    assert torch.isfinite(merged).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_vision_weight_is_an_error(family, checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints[family], tmp_path / "ckpt")
    key = vision_keys(path)[0]
    rewrite_weights(path, lambda tensors: tensors.pop(key))
    with pytest.raises(ModelLoadError, match=r"1 tensor\(s\) missing \("):
        load_encoder(ModelConfig(str(path)))


@pytest.mark.parametrize("family", FAMILIES)
def test_renamed_vision_weight_is_an_error(family, checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints[family], tmp_path / "ckpt")
    key = next(k for k in vision_keys(path) if k.endswith(".weight"))
    renamed = key.removesuffix(".weight") + "_renamed.weight"
    rewrite_weights(path, lambda tensors: tensors.update({renamed: tensors.pop(key)}))
    with pytest.raises(ModelLoadError, match=r"1 tensor\(s\) unexpected"):
        load_encoder(ModelConfig(str(path)))


def test_shape_mismatch_is_an_error(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["qwen2_vl"], tmp_path / "ckpt")
    rewrite_weights(path, lambda t: t.update({"visual.merger.ln_q.weight": torch.ones(7)}))
    with pytest.raises(ModelLoadError, match=r"1 tensor\(s\) of another shape \(visual\.merger\.ln_q\.weight\)"):
        load_encoder(ModelConfig(str(path)))


def test_many_missing_weights_are_counted_not_listed(checkpoints, tmp_path):
    """A checkpoint of another configuration misses hundreds of keys: the error stays one short line."""
    path = copy_checkpoint(checkpoints["qwen2_5_vl"], tmp_path / "ckpt")
    keys = vision_keys(path)
    rewrite_weights(path, lambda tensors: [tensors.pop(key) for key in keys[1:]])
    with pytest.raises(ModelLoadError) as failed:
        load_encoder(ModelConfig(str(path)))
    message = str(failed.value)
    assert f"{len(keys) - 1} tensor(s) missing (" in message and message.endswith(", ...)")
    assert "\n" not in message and message.count("visual.") == 3


def test_checkpoint_without_vision_weights_says_so(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["qwen2_vl"], tmp_path / "ckpt")
    keys = vision_keys(path)
    rewrite_weights(path, lambda tensors: [tensors.pop(key) for key in keys])
    with pytest.raises(ModelLoadError, match=r"has no vision weights \(no tensor under visual\., model\.visual\.\)"):
        load_encoder(ModelConfig(str(path)))


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="checks the error of a machine without a CUDA GPU")
def test_a_device_that_is_not_there_fails_before_loading(checkpoints):
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ModelLoadError, match="no CUDA GPU is visible"):
            load_encoder(ModelConfig(str(checkpoints["qwen2_vl"]), device=device))
    with pytest.raises(ModelLoadError, match="'gpu' is not a device"):
        load_encoder(ModelConfig(str(checkpoints["qwen2_vl"]), device="gpu"))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "kimi_k25"])
def test_only_vision_shards_are_read(family, checkpoints, encoders, tmp_path):
    """Shard the checkpoint into vision and LLM files, then make the LLM shard unreadable."""
    path = copy_checkpoint(checkpoints[family], tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    shards = {"vision.safetensors": {}, "llm.safetensors": {}}
    for key, value in tensors.items():
        shards["vision.safetensors" if key.startswith(VISION_PREFIXES) else "llm.safetensors"][key] = value
    for name, shard in shards.items():
        save_file(shard, path / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: n for n, shard in shards.items() for k in shard}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "model.safetensors").unlink()
    (path / "llm.safetensors").write_bytes(b"\x00garbage, not safetensors")

    encoder = load_encoder(ModelConfig(str(path)))
    assert encoder.namespace == encoders[family].namespace
    pixel_values, grid_thw = batch(encoder)
    sharded, single = encoder.forward(pixel_values, grid_thw), encoders[family].forward(pixel_values, grid_thw)
    for a, b in zip(sharded[0], single[0], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_layouts_load_the_same_encoder(family, checkpoints, encoders, tmp_path):
    """transformers saves Qwen2/2.5-VL with "visual." and Kimi in Moonshot's fused-qkv layout by default;
    its native layout ("model.visual.", "model.vision_tower." ...) must give the very same encoder."""
    full = AutoModelForImageTextToText.from_pretrained(checkpoints[family])
    full.save_pretrained(tmp_path / "native", save_original_format=False)
    shutil.copy(checkpoints[family] / "preprocessor_config.json", tmp_path / "native")
    native_keys = vision_keys(tmp_path / "native")
    assert native_keys and all(k.startswith("model.") for k in native_keys)
    assert native_keys != vision_keys(checkpoints[family]) or family == "qwen3_vl"  # Qwen3-VL saves natively
    assert load_encoder(ModelConfig(str(tmp_path / "native"))).namespace == encoders[family].namespace


def test_kimi_hub_layout(checkpoints, encoders, tmp_path):
    """moonshotai's files keep patch_embed and the projector's pre_norm outside `encoder.` / `model.`,
    where transformers' reverse mapping does not put them back."""
    path = copy_checkpoint(checkpoints["kimi_k25"], tmp_path / "hub")
    hub_names = {
        "vision_tower.encoder.patch_embed.": "vision_tower.patch_embed.",
        "model.mm_projector.": "mm_projector.",
    }

    def to_hub(tensors):
        for key in list(tensors):
            for saved, hub in hub_names.items():
                if key.startswith(saved):
                    tensors[hub + key.removeprefix(saved)] = tensors.pop(key)

    rewrite_weights(path, to_hub)
    keys = vision_keys(path)
    assert "vision_tower.patch_embed.proj.weight" in keys and "mm_projector.pre_norm.weight" in keys
    assert load_encoder(ModelConfig(str(path))).namespace == encoders["kimi_k25"].namespace


def test_namespace_is_stable_and_tracks_every_input(checkpoints, encoders, tmp_path):
    source = checkpoints["qwen2_5_vl"]
    baseline = encoders["qwen2_5_vl"].namespace
    assert len(baseline) == 32 and int(baseline, 16) >= 0
    assert load_encoder(ModelConfig(str(source))).namespace == baseline
    assert load_encoder(ModelConfig(str(source), dtype="bfloat16")).namespace != baseline
    assert len({e.namespace for e in encoders.values()}) == len(FAMILIES)

    one_value = copy_checkpoint(source, tmp_path / "one_value")
    key = "visual.blocks.0.attn.qkv.bias"
    rewrite_weights(one_value, lambda tensors: tensors[key].view(-1)[0].add_(1e-3))
    assert load_encoder(ModelConfig(str(one_value))).namespace != baseline

    pixels = copy_checkpoint(source, tmp_path / "pixels")
    processor = json.loads((pixels / "preprocessor_config.json").read_text())
    processor["max_pixels"] = processor["size"]["longest_edge"] = 64 * 28 * 28
    (pixels / "preprocessor_config.json").write_text(json.dumps(processor))
    changed = load_encoder(ModelConfig(str(pixels)))
    assert changed.preprocess_config.max_pixels == 64 * 28 * 28
    assert changed.namespace != baseline


def test_dtype_selection(checkpoints, encoders):
    assert encoders["qwen3_vl"].dtype == torch.float32
    encoder = load_encoder(ModelConfig(str(checkpoints["qwen3_vl"]), dtype="bfloat16"))
    assert encoder.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in encoder.module.parameters())
    pixel_values, grid_thw = batch(encoder)
    low = encoder.forward(pixel_values, grid_thw)
    high = encoders["qwen3_vl"].forward(pixel_values, grid_thw)
    assert low[0][0].dtype == torch.bfloat16
    torch.testing.assert_close(low[0][0].float(), high[0][0], rtol=0.1, atol=0.1 * high[0][0].abs().max().item())
    with pytest.raises(ModelLoadError, match="dtype"):
        load_encoder(ModelConfig(str(checkpoints["qwen3_vl"]), dtype="int8"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_encoder(checkpoints, encoders):
    for family in FAMILIES:
        reference = encoders[family]
        pixel_values, grid_thw = batch(reference)
        expected = reference.forward(pixel_values, grid_thw)
        fast = load_encoder(ModelConfig(str(checkpoints[family]), "cuda"))  # "auto": bfloat16
        exact = load_encoder(ModelConfig(str(checkpoints[family]), "cuda", "float32"))
        assert fast.dtype == torch.bfloat16 and fast.namespace != exact.namespace == reference.namespace
        # float32 is not bit-exact on GPU: cuDNN runs the patch-embedding convolution in TF32 by default.
        for encoder, tolerance in ((exact, 2e-3), (fast, 5e-2)):
            outputs = encoder.forward(pixel_values, grid_thw)
            for image, reference_image in zip(outputs, expected, strict=True):
                for output, cpu in zip(image, reference_image, strict=True):
                    assert output.device.type == "cuda" and output.dtype == encoder.dtype
                    scale = cpu.abs().max().item()
                    torch.testing.assert_close(output.cpu().float(), cpu, rtol=tolerance, atol=tolerance * scale)


def test_tiny_random_builds_once(monkeypatch, tmp_path):
    monkeypatch.setenv("VITCACHE_HOME", str(tmp_path))
    encoder = load_encoder(ModelConfig("tiny-random"))
    assert (encoder.family, encoder.model_name) == ("qwen2_5_vl", "tiny-random")
    (built,) = tmp_path.iterdir()
    assert load_encoder(ModelConfig("tiny-random")).namespace == encoder.namespace
    assert list(tmp_path.iterdir()) == [built]
    pixel_values, grid_thw = batch(encoder)
    assert len(encoder.forward(pixel_values, grid_thw)) == len(GRIDS)


def test_tiny_checkpoints_are_deterministic(tmp_path):
    first = make_tiny_checkpoint("qwen3_vl", tmp_path / "a", seed=1)
    second = make_tiny_checkpoint("qwen3_vl", tmp_path / "b", seed=1)
    other = make_tiny_checkpoint("qwen3_vl", tmp_path / "c", seed=2)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_validate_grid(encoders):
    qwen, kimi = encoders["qwen2_vl"], encoders["kimi_k25"]
    qwen.validate_grid((1, 4, 6))
    qwen.validate_grid((3, 4, 6))  # video clips keep every temporal patch
    assert qwen.tokens_for((3, 4, 6)) == 18
    assert kimi.tokens_for((3, 4, 6)) == 6  # Kimi pools the frames
    for bad in [(0, 4, 6), (1, 3, 6), (1, 4, 5), (1, -2, 4), (1.0, 4, 6), (1, 4)]:
        with pytest.raises(ValueError):
            qwen.validate_grid(bad)
    with pytest.raises(ValueError, match="frames"):
        kimi.validate_grid((5, 4, 6))


def test_encode_checks_pixel_values_against_grids(encoders):
    encoder = encoders["qwen2_vl"]
    pixel_values, grid_thw = batch(encoder)
    with pytest.raises(ValueError, match="do not match"):
        encoder.forward(pixel_values[1:], grid_thw)
    with pytest.raises(ValueError, match="multiples"):
        encoder.forward(pixel_values[:15], torch.tensor([[1, 3, 5]]))


def test_load_errors(checkpoints, tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_encoder(ModelConfig(str(tmp_path / "nowhere")))
    with pytest.raises(ModelLoadError, match=r"it has no config\.json"):
        load_encoder(ModelConfig(str(tmp_path)))
    other = copy_checkpoint(checkpoints["qwen2_vl"], tmp_path / "other")
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="model_type"):
        load_encoder(ModelConfig(str(other)))
    (other / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(ModelLoadError, match="config"):
        load_encoder(ModelConfig(str(other)))
    no_weights = copy_checkpoint(checkpoints["qwen2_vl"], tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_encoder(ModelConfig(str(no_weights)))
