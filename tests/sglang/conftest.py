"""Fixtures for the SGLang tests, which run in .venv-sglang (scripts/sglang_env.sh) against sglang's released code.

The vitcache servers run from .venv (the main environment: transformers 5.23) as subprocesses; SGLang's side
runs here with its own transformers pin. The main suite has no sglang and does not collect this folder.
"""

from __future__ import annotations

import importlib.util
import io
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..serve_process import ServeProcess

if importlib.util.find_spec("sglang") is None:
    collect_ignore_glob = ["test_*.py"]  # scripts/test.sh runs these with .venv-sglang/bin/python

REPO = Path(__file__).resolve().parents[2]
MAIN_VENV = REPO / ".venv" / "bin"
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
FAMILIES = (*QWEN_FAMILIES, "kimi_k25")
# The tiny checkpoints' special tokens (vitcache/models/tiny.py) and a few words, for a word-level tokenizer.
SPECIAL_TOKENS = {"<|image_pad|>": 500, "<|video_pad|>": 501, "<|vision_start|>": 502, "<|vision_end|>": 503}
KIMI_SPECIAL_TOKENS = {"<|media_pad|>": 500}  # Kimi-K2.5's image placeholder, at the tiny config's image_token_id
# Qwen3-VL's video prompt text ("<0.1 seconds>" per temporal group) has words too, so a wrong timestamp is a wrong id.
WORDS = ("<unk>", "<pad>", "describe", "and", "then", ".", "seconds>", "<0.0", "<0.1", "<0.2")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random checkpoints of the four families, written by vitcache.models.tiny in the main venv."""
    root = tmp_path_factory.mktemp("checkpoints")
    script = (
        "import sys; from vitcache.models.tiny import make_tiny_checkpoint as m; "
        "[m(f, sys.argv[1] + f) for f in sys.argv[2:]]"
    )
    subprocess.run([str(MAIN_VENV / "python"), "-c", script, f"{root}/", *FAMILIES], check=True, capture_output=True)
    return {family: root / family for family in FAMILIES}


@pytest.fixture(scope="session")
def vitcache_targets(
    checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """One vitcache server per family, started together (each loads in a few seconds)."""
    logs, command = tmp_path_factory.mktemp("logs"), [str(MAIN_VENV / "vitcache")]
    servers = {
        family: ServeProcess(["--model", str(path)], logs / f"{family}.log", command)
        for family, path in checkpoints.items()
    }
    try:
        for server in servers.values():
            server.wait_listening()
        yield {family: server.target for family, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()


def tiny_tokenizer(special_tokens: dict[str, int] = SPECIAL_TOKENS):  # type: ignore[no-untyped-def]
    """A word-level fast tokenizer with the tiny checkpoints' vision tokens at their ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(WORDS)} | special_tokens
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", additional_special_tokens=list(special_tokens)
    )


def png(width: int, height: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()
