"""The model families vitcache serves, keyed by the ``model_type`` of their checkpoints' config.json.

Adding a family: a vitcache/models/<model_type>.py with a :class:`~vitcache.models.family.ModelFamily`
subclass, and its line here.
"""

from __future__ import annotations

from vitcache.models.family import ModelFamily
from vitcache.models.kimi_k25 import KimiK25
from vitcache.models.qwen2_5_vl import Qwen2_5VL
from vitcache.models.qwen2_vl import Qwen2VL
from vitcache.models.qwen3_vl import Qwen3VL

FAMILIES: dict[str, ModelFamily] = {
    "qwen2_vl": Qwen2VL(),
    "qwen2_5_vl": Qwen2_5VL(),
    "qwen3_vl": Qwen3VL(),
    "kimi_k25": KimiK25(),
}

# The built-in "tiny-random" model is a tiny checkpoint of this family.
TINY_RANDOM_FAMILY = "qwen2_5_vl"
