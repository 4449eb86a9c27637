"""Lets torchvision 0.28's CUDA wheel import beside CPU torch 2.13 in .venv-vllm (scripts/vllm_env.sh installs it,
with a .pth line that imports this module at interpreter start-up).

There is no CPU torchvision wheel for torch 2.13 here. The CUDA wheel's compiled ops (``torchvision/_C.so``) link
against libtorch_cuda, so they do not load; torchvision then runs without them (nms, roi_align, ... raise), except
that its ``_meta_registrations`` registers fake kernels for ``torchvision::nms`` and ``::qnms`` unguarded, which
raises "operator torchvision::nms does not exist" and fails every ``import torchvision`` (and so transformers' and
vLLM's Qwen processors). Declaring those two schemas (as _C.so would) just before torchvision is first imported lets
the import finish; the Python-level transforms vLLM's video path uses need no compiled op.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any

# The two ops torchvision registers fake kernels for without checking that its compiled library loaded.
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_declared: list[Any] = []  # the torch.library.Library holding them: the declarations live as long as it does


class _DeclareOpsBeforeTorchvision(importlib.abc.MetaPathFinder):
    """Declares the schemas on the first ``import torchvision``, then leaves the import to the usual finders."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch

            library = torch.library.Library("torchvision", "DEF")
            for schema in _SCHEMAS:
                library.define(schema)
            _declared.append(library)
        return None


sys.meta_path.insert(0, _DeclareOpsBeforeTorchvision())
