"""The model families are one file each behind one protocol: nothing else knows their names, and a new one
is a new file plus its registry line (here a fifth family defined in this test, through the real loader)."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLConfig

import vitcache.models
from vitcache.config import ModelConfig
from vitcache.models.family import ModelFamily
from vitcache.models.loading import load_encoder
from vitcache.models.preprocess import preprocess
from vitcache.models.qwen2_5_vl import Qwen2_5VL
from vitcache.models.registry import FAMILIES
from vitcache.models.tiny import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = ROOT / "vitcache" / "models" / "registry.py"


def test_every_family_is_registered_under_its_model_type_from_its_own_file() -> None:
    for name, family in FAMILIES.items():
        assert family.config_cls.model_type == name
        assert type(family).__module__ == f"vitcache.models.{name}"
    defined = {
        cls
        for info in pkgutil.iter_modules(vitcache.models.__path__)
        for _, cls in inspect.getmembers(importlib.import_module(f"vitcache.models.{info.name}"), inspect.isclass)
        if issubclass(cls, ModelFamily) and not inspect.isabstract(cls)
    }
    assert defined == {type(family) for family in FAMILIES.values()}


def _family_name_mentions(path: Path) -> set[str]:
    """The family names that ``path``'s string literals (docstrings included) mention as words."""
    words = re.compile(r"\b(" + "|".join(map(re.escape, FAMILIES)) + r")\b")
    return {
        match
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        for match in words.findall(node.value)
    }


def test_no_module_outside_a_family_file_names_a_family() -> None:
    """Code can only switch on a family by naming it: outside the registry, a family's name is its own file's."""
    found = {}
    for path in sorted([*(ROOT / "vitcache").rglob("*.py"), *(ROOT / "server").rglob("*.py")]):
        own = {path.stem} if path.parent.name == "models" and path.stem in FAMILIES else set()
        if path != REGISTRY and (names := _family_name_mentions(path) - own):
            found[str(path.relative_to(ROOT))] = sorted(names)
    assert found == {}


class FifthConfig(Qwen2_5_VLConfig):
    model_type = "vitcache_fifth_vl"


class FifthVL(Qwen2_5VL):
    """What a new family's file holds when its tower is an existing one: the classes that differ."""

    config_cls = FifthConfig


def test_a_fifth_family_is_one_class_and_one_registry_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(FAMILIES, "vitcache_fifth_vl", FifthVL())
    fifth = load_encoder(ModelConfig(str(make_tiny_checkpoint("vitcache_fifth_vl", tmp_path / "fifth", seed=4))))
    same_tower = load_encoder(ModelConfig(str(make_tiny_checkpoint("qwen2_5_vl", tmp_path / "qwen2_5_vl", seed=4))))

    assert fifth.family == "vitcache_fifth_vl"
    assert fifth.namespace != same_tower.namespace  # the family is part of what the cache keys on
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    pixel_values, grid = preprocess(image, fifth.preprocess_config)
    (outputs,) = fifth.forward(pixel_values, torch.tensor([grid]))
    (expected,) = same_tower.forward(pixel_values, torch.tensor([grid]))
    assert [o.shape for o in outputs] == [(fifth.tokens_for(grid), size) for size in fifth.output_hidden_sizes]
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
