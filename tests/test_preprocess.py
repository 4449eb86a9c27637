import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFile
from transformers import Qwen2VLImageProcessorPil
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from vitcache.encode.decode import DecodeLimits, decode_image, raw_image
from vitcache.errors import ImageRejected
from vitcache.models.kimi_k25 import KIMI_DEFAULTS, KimiK25PreprocessConfig
from vitcache.models.preprocess import PreprocessConfig, image_grid, preprocess
from vitcache.models.qwen2_vl import Qwen2VLPreprocessConfig

LIMITS = DecodeLimits()
QWEN_PROCESSOR = {"min_pixels": 4 * 28 * 28, "max_pixels": 128 * 28 * 28}
KIMI_PROCESSOR = {"size": {"max_height": 32, "max_width": 32}, "max_patches": 256}


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth shading plus hard edges: the content where resize implementations differ most."""
    rng = np.random.default_rng(seed)
    shading = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(shading)
    draw.rectangle([width // 4, height // 4, width // 2, height // 2], fill=(250, 20, 30))
    draw.line([0, 0, width, height], fill=(0, 0, 0), width=max(1, width // 40))
    return np.asarray(shading)


def with_png_size(data: bytes, width: int, height: int) -> bytes:
    """The same PNG with its header claiming another size (CRC fixed, so Pillow trusts it)."""
    data = bytearray(data)
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def qwen_config(tmp_path, **processor) -> PreprocessConfig:
    Qwen2VLImageProcessorPil(**{**QWEN_PROCESSOR, **processor}).save_pretrained(tmp_path)
    return Qwen2VLPreprocessConfig.from_pretrained(tmp_path)


def kimi_config(tmp_path) -> PreprocessConfig:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(KIMI_PROCESSOR))
    return KimiK25PreprocessConfig.from_pretrained(tmp_path)


# --- decoding ---------------------------------------------------------------------------------------


def test_decode_png_is_lossless():
    rgb = photo(37, 53)
    out = decode_image(encode(Image.fromarray(rgb)), LIMITS)
    assert out.dtype == np.uint8 and out.shape == (37, 53, 3)
    np.testing.assert_array_equal(out, rgb)


def test_decode_jpeg_matches_pillow():
    data = encode(Image.fromarray(photo(40, 30)), "JPEG", quality=80)
    np.testing.assert_array_equal(decode_image(data, LIMITS), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


@pytest.mark.parametrize(
    "image",
    [
        Image.fromarray(photo(20, 30)[..., 0]),  # L
        Image.fromarray(photo(20, 30)).convert("P"),
        Image.fromarray(photo(20, 30)).convert("CMYK"),
        Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 50),  # I;16
    ],
    ids=["grayscale", "palette", "cmyk", "16bit"],
)
def test_decode_opaque_modes_convert_like_pil(image):
    data = encode(image, "TIFF" if image.mode == "CMYK" else "PNG")
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    out = decode_image(data, LIMITS)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_decode_grayscale_replicates_channels():
    gray = photo(20, 30)[..., 1]
    out = decode_image(encode(Image.fromarray(gray)), LIMITS)
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_decode_transparency_composites_on_white(mode):
    """HF's processors blend transparent pixels onto white rather than dropping alpha."""
    rgba = np.dstack([photo(20, 30), np.tile(np.linspace(0, 255, 30).astype(np.uint8), (20, 1))])
    image = Image.fromarray(rgba)
    if mode == "LA":
        image = image.convert("LA")
    if mode == "P":  # palette with one fully transparent index
        image = Image.fromarray(photo(20, 30)).convert("P")
        image.info["transparency"] = int(np.asarray(image)[0, 0])
    source = np.asarray(Image.open(io.BytesIO(encode(image))).convert("RGBA")).astype(np.float64)
    alpha = source[..., 3:] / 255
    expected = alpha * source[..., :3] + (1 - alpha) * 255
    out = decode_image(encode(image), LIMITS)
    np.testing.assert_allclose(out, expected, atol=1)  # PIL's alpha_composite rounds in integer arithmetic


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"definitely not an image",
        encode(Image.fromarray(photo(64, 64)))[:600],
        encode(Image.fromarray(photo(64, 64)), "JPEG")[:-200],
        with_png_size(encode(Image.new("RGB", (1, 1))), 0, 10),
    ],
    ids=["empty", "garbage", "truncated-png", "truncated-jpeg", "zero-width"],
)
def test_decode_rejects_unusable_input(data):
    with pytest.raises(ImageRejected):
        decode_image(data, LIMITS)


def test_decode_accepts_only_raster_formats():
    image = Image.fromarray(photo(20, 30))
    for fmt in ("JPEG", "WEBP", "GIF", "BMP", "TIFF"):
        assert decode_image(encode(image, fmt), LIMITS).shape == (20, 30, 3), fmt
    for fmt in ("TGA", "PCX", "EPS"):  # Pillow reads these, the service does not
        with pytest.raises(ImageRejected, match="not a decodable image: its bytes are none of PNG, JPEG, WEBP"):
            decode_image(encode(image, fmt), LIMITS)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"definitely not an image", "not a decodable image: its bytes are none of PNG, JPEG, WEBP, GIF, BMP, TIFF"),
        (encode(Image.fromarray(photo(64, 64)))[:600], "not a decodable PNG image: image file is truncated"),
        (encode(Image.fromarray(photo(64, 64)), "JPEG")[:-200], "not a decodable JPEG image: image file is truncated"),
    ],
    ids=["garbage", "truncated-png", "truncated-jpeg"],
)
def test_decode_errors_say_what_the_file_is_not(data, message):
    """Not Pillow's "cannot identify image file <_io.BytesIO object at 0x...>": no Python reprs."""
    with pytest.raises(ImageRejected) as rejected:
        decode_image(data, LIMITS)
    assert str(rejected.value).startswith(message)
    assert " at 0x" not in str(rejected.value) and "<" not in str(rejected.value)


def test_decode_rejects_too_many_bytes():
    data = encode(Image.fromarray(photo(64, 64)))
    with pytest.raises(ImageRejected, match="bytes"):
        decode_image(data, DecodeLimits(max_image_bytes=len(data) - 1))
    assert decode_image(data, DecodeLimits(max_image_bytes=len(data))).shape == (64, 64, 3)


def test_decode_rejects_bomb_from_header_without_decoding(monkeypatch):
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self))
    bomb = with_png_size(encode(Image.new("1", (1, 1))), 9000, 9000)  # 81 Mpx, under Pillow's own limit
    with pytest.raises(ImageRejected, match="over the limit"):
        decode_image(bomb, LIMITS)
    assert loads == []


def test_decode_guards_pillows_bomb_check():
    bomb = with_png_size(encode(Image.new("1", (1, 1))), 50000, 50000)
    with pytest.raises(ImageRejected, match="too many pixels"):
        decode_image(bomb, DecodeLimits(max_image_pixels=10**12))


def test_raw_image_is_a_zero_copy_view():
    rgb = photo(5, 7)
    data = rgb.tobytes()
    out = raw_image(data, 5, 7, LIMITS)
    np.testing.assert_array_equal(out, rgb)
    assert np.shares_memory(out, np.frombuffer(data, dtype=np.uint8))


@pytest.mark.parametrize(
    ("size", "height", "width", "limits"),
    [
        (5 * 7 * 3 - 1, 5, 7, LIMITS),
        (0, 0, 7, LIMITS),
        (0, 5, 0, LIMITS),
        (300, 10, 10, DecodeLimits(max_image_pixels=99)),
    ],
    ids=["short", "zero-height", "zero-width", "too-many-pixels"],
)
def test_raw_image_validates(size, height, width, limits):
    with pytest.raises(ImageRejected):
        raw_image(bytes(size), height, width, limits)


# --- config -----------------------------------------------------------------------------------------


def test_qwen_config_resolves_like_hf(tmp_path):
    # Legacy min/max_pixels win over `size`, exactly as in the HF processor's constructor.
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 1, "longest_edge": 2}, "min_pixels": 3136, "max_pixels": 50176})
    )
    config = Qwen2VLPreprocessConfig.from_pretrained(tmp_path)
    assert (config.min_pixels, config.max_pixels) == (3136, 50176)
    (tmp_path / "preprocessor_config.json").write_text("{}")
    config = Qwen2VLPreprocessConfig.from_pretrained(tmp_path)
    assert (config.min_pixels, config.max_pixels) == (56 * 56, 28 * 28 * 1280)
    assert (config.patch_size, config.merge_size, config.temporal_patch_size) == (14, 2, 2)
    assert (config.image_mean, config.image_std) == (tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD))
    assert config.patch_dim == 3 * 2 * 14 * 14


def test_kimi_config_defaults(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text("{}")
    config = KimiK25PreprocessConfig.from_pretrained(tmp_path)
    assert (config.max_patches, config.max_size_per_side, config.patch_size, config.merge_size) == (16384, 512, 14, 2)
    assert config.patch_dim == 3 * 14 * 14


def test_config_refuses_unsupported_processing(tmp_path):
    with pytest.raises(ValueError, match="unsupported"):
        qwen_config(tmp_path, do_normalize=False)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"max_height": 32, "max_width": 64}}))
    with pytest.raises(ValueError, match="max_width"):
        KimiK25PreprocessConfig.from_pretrained(tmp_path)


def test_config_json_is_canonical(tmp_path):
    config = qwen_config(tmp_path)
    assert json.loads(config.to_json())["max_pixels"] == QWEN_PROCESSOR["max_pixels"]
    assert config.to_json() == json.dumps(json.loads(config.to_json()), sort_keys=True)
    assert qwen_config(tmp_path, max_pixels=64 * 28 * 28).to_json() != config.to_json()


# --- preprocessing ----------------------------------------------------------------------------------

# (height, width): no resize, non-square down/upscales, below min_pixels, above max_pixels, extreme aspect.
SIZES = [(56, 84), (100, 150), (150, 100), (20, 30), (1000, 700), (30, 900)]


def levels(diff: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """Differences of normalized pixel_values expressed in uint8 levels of the source image."""
    per_channel = torch.tensor(config.image_std).repeat_interleave(config.patch_dim // 3)
    return diff.abs() * per_channel / config.rescale_factor


def assert_close_in_levels(diff: torch.Tensor) -> None:
    """What separates a float resize from one with clamped uint8 intermediate passes (PIL, torchvision CPU)."""
    assert diff.mean() < 0.5
    assert (diff <= 1 + 1e-3).float().mean() > 0.95


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_qwen_matches_pil_processor(tmp_path, height, width):
    """PIL resizes in two separable passes with a clamped, rounded uint8 intermediate, while we (like
    torchvision on GPU) resize in float and round once. That moves values by at most one level except next
    to hard edges, where bicubic overshoot is clipped between the passes (up to ~25 levels; those pixels are
    ~1% of a photo, a few % of a small upscaled one). Hence: the grid and layout exactly, the values within
    one level almost everywhere and half a level on average, and bit-exact when no resize happens."""
    config = qwen_config(tmp_path)
    image = photo(height, width)
    expected = Qwen2VLImageProcessorPil(**QWEN_PROCESSOR)(
        images=[image], return_tensors="pt", input_data_format="channels_last"
    )
    pixel_values, grid = preprocess(image, config)
    assert [grid] == [tuple(g) for g in expected["image_grid_thw"].tolist()]
    assert pixel_values.dtype == torch.float32 and pixel_values.shape == expected["pixel_values"].shape
    diff = levels(pixel_values - expected["pixel_values"], config)
    if (height, width) == (56, 84):
        assert diff.max() < 1e-3
    assert_close_in_levels(diff)


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_image_grid_is_the_grid_preprocessing_gives(tmp_path, height, width):
    config = qwen_config(tmp_path)
    assert image_grid(height, width, config) == preprocess(photo(height, width), config)[1]


@pytest.mark.parametrize("kind", ["qwen2_vl", "kimi_k25"])
def test_check_frame_takes_every_grid_preprocessing_makes_and_no_far_larger(tmp_path, kind):
    """Pixel batches are held to this bound (#14 item 7); it must never refuse what preprocessing makes."""
    if kind == "kimi_k25":
        pytest.importorskip("torchvision")  # transformers' navit_resize lives in a module importing it
    config = qwen_config(tmp_path) if kind == "qwen2_vl" else kimi_config(tmp_path)
    sizes = range(28, 1500, 29)
    grids = {image_grid(height, width, config)[1:] for height in sizes for width in sizes}
    for height, width in grids:
        config.check_frame(height, width)
    largest = max(h * w for h, w in grids)
    with pytest.raises(ValueError, match="max_"):
        config.check_frame(2, largest)
    with pytest.raises(ValueError, match="max_"):
        config.check_frame(128, 128)


def test_preprocess_accepts_torch_and_read_only_views(tmp_path):
    config = qwen_config(tmp_path)
    image = photo(100, 150)
    expected, grid = preprocess(image, config)
    view = raw_image(image.tobytes(), 100, 150, LIMITS)
    for source in (view, torch.from_numpy(image.copy())):
        pixel_values, same_grid = preprocess(source, config, device="cpu")
        assert same_grid == grid
        torch.testing.assert_close(pixel_values, expected, rtol=0, atol=0)


def test_preprocess_rejects_extreme_aspect_ratio(tmp_path):
    with pytest.raises(ImageRejected, match="aspect ratio"):
        preprocess(np.zeros((1, 300, 3), dtype=np.uint8), qwen_config(tmp_path))


def test_preprocess_validates_input_layout(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((10, 10, 4), dtype=np.uint8), qwen_config(tmp_path))


def test_kimi_rescales_normalises_and_pads_by_hand():
    """Kimi-K2.5's steps, computed by hand (no HF processor): pad the (resized) image with black at the
    bottom and right to multiples of patch_size * merge_size, rescale by 1/255, normalise each channel
    with its own mean and std, and cut patches in raster order, each one (channel, row, column)."""
    config = KimiK25PreprocessConfig(
        patch_size=2,
        temporal_patch_size=1,
        merge_size=2,
        max_patches=1024,
        max_size_per_side=64,  # a 3x5 image is within both bounds: not resized
        image_mean=(0.1, 0.2, 0.3),
        image_std=(0.5, 0.25, 0.125),
        rescale_factor=1 / 255,
    )
    image = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3) * 5
    image[0, 0] = 255
    pixel_values, grid = preprocess(image, config)
    assert grid == image_grid(3, 5, config) == (1, 2, 4)  # padded to 4x8 pixels: multiples of 2 * 2

    padded = np.zeros((4, 8, 3))
    padded[:3, :5] = image
    normalised = (padded / 255 - np.array(config.image_mean)) / np.array(config.image_std)
    expected = [normalised[y : y + 2, x : x + 2].transpose(2, 0, 1).ravel() for y in (0, 2) for x in (0, 2, 4, 6)]
    torch.testing.assert_close(pixel_values, torch.tensor(np.stack(expected), dtype=torch.float32))
    # The same, by hand: white in the first pixel, (1 - mean) / std ...
    assert pixel_values[0, [0, 4, 8]].tolist() == pytest.approx([1.8, 3.2, 5.6], abs=1e-5)
    # ... and the padding black, -mean / std: the whole last patch of the first row, the last row of the second.
    black = [-0.2] * 4 + [-0.8] * 4 + [-2.4] * 4
    assert pixel_values[3].tolist() == pytest.approx(black, abs=1e-5)
    assert pixel_values[4].view(3, 2, 2)[:, 1].flatten().tolist() == pytest.approx(black[::2], abs=1e-5)


# --- against the torchvision-backed processors (they run where torchvision is installed) ------------

# torchvision resizes uint8 on CPU with a native integer kernel (PIL-like, two clamped passes) and on GPU in
# float; `preprocess` is the float path, so it is compared bit-for-bit where a GPU runs both.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_matches_torchvision(pixel_values, expected, config):
    diff = levels(pixel_values.cpu() - expected.cpu(), config)
    if DEVICE == "cuda":
        assert diff.max() < 1e-3  # float32 rounding of the fused normalize, far below one level
    else:
        assert_close_in_levels(diff)


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_qwen_matches_torchvision_processor(tmp_path, height, width):
    pytest.importorskip("torchvision")
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    config = qwen_config(tmp_path)
    image = photo(height, width)
    expected = Qwen2VLImageProcessor(**QWEN_PROCESSOR)(
        images=[torch.tensor(image).permute(2, 0, 1)], return_tensors="pt", device=DEVICE
    )
    pixel_values, grid = preprocess(image, config, device=DEVICE)
    assert [grid] == [tuple(g) for g in expected["image_grid_thw"].tolist()]
    assert pixel_values.shape == expected["pixel_values"].shape
    assert_matches_torchvision(pixel_values, expected["pixel_values"], config)


@pytest.mark.parametrize(("height", "width"), [*SIZES, (700, 30)])
def test_kimi_matches_torchvision_processor(tmp_path, height, width):
    pytest.importorskip("torchvision")
    from transformers.models.kimi_k25.image_processing_kimi_k25 import Kimi_K25ImageProcessor, navit_resize

    config = kimi_config(tmp_path)
    processor = Kimi_K25ImageProcessor(**KIMI_PROCESSOR)
    image = photo(height, width)
    expected = processor(images=[torch.tensor(image).permute(2, 0, 1)], return_tensors="pt", device=DEVICE)
    pixel_values, grid = preprocess(image, config, device=DEVICE)

    (_, resized_w), (padded_h, padded_w) = navit_resize(height, width, 14, 2, 256, 32)
    assert grid == (1, padded_h // 14, padded_w // 14)
    assert [grid] == [tuple(g) for g in expected["image_grid_thw"].tolist()]
    assert grid[1] * grid[2] == processor.get_number_of_image_patches(height, width)
    assert pixel_values.shape == (grid[1] * grid[2], config.patch_dim)
    assert_matches_torchvision(pixel_values, expected["pixel_values"].flatten(1), config)
    # Padding (bottom/right) is black before normalization, i.e. -mean/std after it.
    patches = pixel_values.cpu().view(grid[1], grid[2], 3, 14, 14)
    if padded_w > resized_w:
        torch.testing.assert_close(patches[0, -1, :, 0, -1], torch.full((3,), -1.0))


def test_kimi_defaults_match_hf_processor():
    pytest.importorskip("torchvision")
    from transformers.models.kimi_k25.image_processing_kimi_k25 import Kimi_K25ImageProcessor

    processor = Kimi_K25ImageProcessor()
    assert dict(processor.size) == KIMI_DEFAULTS["size"]
    for name in ("patch_size", "merge_size", "max_patches", "rescale_factor"):
        assert getattr(processor, name) == KIMI_DEFAULTS[name], name
    for name in ("image_mean", "image_std"):
        assert tuple(getattr(processor, name)) == tuple(KIMI_DEFAULTS[name]), name
