"""The tensor the vLLM connector builds from vitcache's outputs is what vLLM's ``embed_multimodal`` returns per image.

vLLM cannot be imported in this venv (it needs transformers<5.21), so the expected layout is vLLM 0.33.0's rule,
applied to transformers' own model outputs:
- Qwen2-VL, Qwen2.5-VL: the merger's tokens split per image (vllm/model_executor/models/qwen2_vl.py:1504 and
  qwen2_5_vl.py:1530, ``image_embeds.split(sizes)`` in ``_process_image_input``);
- Qwen3-VL: ``torch.cat([hidden_states] + deepstack_feature_lists, dim=1)`` (qwen3_vl.py:902, the vision
  transformer's forward), split per image the same way;
- Kimi-K2.5: the projector's output per image as ``(tokens, hidden)`` (kimi_k25_vit.py:851 and 887,
  ``mm_projector_forward`` / ``vision_tower_forward``).
"""

import pytest
import torch
from transformers import AutoModelForImageTextToText
from vitcache.integrations.vllm_layout import to_device, vllm_layout

from tests.test_models import GRIDS, assert_outputs_close, batch, checkpoints, encoders  # noqa: F401 (fixtures)
from vitcache.models.registry import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_connector_tensor_is_vllm_embed_multimodal_layout(family, checkpoints, encoders):  # noqa: F811
    encoder = encoders[family]
    pixel_values, grid_thw = batch(encoder)
    full = AutoModelForImageTextToText.from_pretrained(checkpoints[family]).eval()
    patch = encoder.preprocess_config.patch_size
    hf_pixels = pixel_values.view(-1, 3, patch, patch) if family == "kimi_k25" else pixel_values
    with torch.no_grad():
        features = full.model.get_image_features(hf_pixels, grid_thw)
    per_output = [features.pooler_output, *getattr(features, "deepstack_features", ())]

    for i, outputs in enumerate(encoder.forward(pixel_values, grid_thw)):
        built = to_device(vllm_layout(family, outputs), "cpu")
        expected = torch.cat([output[i] for output in per_output], dim=1)
        assert expected.shape[1] == (
            sum(encoder.output_hidden_sizes) if family == "qwen3_vl" else per_output[0][i].shape[1]
        )
        assert built.shape == expected.shape
        assert_outputs_close(built, expected)


def test_one_output_families_refuse_extra_outputs():
    with pytest.raises(ValueError, match="has one output"):
        vllm_layout("qwen2_5_vl", [torch.zeros(2, 4), torch.zeros(2, 4)])
