"""Tensor-parallel fan-out: one rank encodes, every rank fetches the same embeddings by digest.

Only digests (16 bytes an image) and per-image errors cross ``torch.distributed``; each rank
takes the embeddings from the server itself (in shared memory on the same host), so a TP
group costs the encoder one computation and uploads each image once. No CUDA context is
opened on the encoder's GPU: tensors arrive on the CPU and move to each rank's own device.

Use a gloo (CPU) group: broadcasting Python objects over NCCL stages them on a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

import grpc
import torch
import torch.distributed as dist

from .client import EncodedImage, ImageFailed, ImageLike, VitCacheClient

#: What rank ``src`` tells the others about each image: its digest, and its error if it failed.
_Shared = list[tuple[bytes, str | None, str]]


def encode_tp(
    client: VitCacheClient,
    images: Sequence[ImageLike] | None,
    *,
    src: int = 0,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str | None = None,
    timeout: float | None = None,
) -> list[EncodedImage]:
    """Embeddings of ``images`` on every rank of ``group``, in input order, on ``device`` (None: CPU).

    ``images`` is read on rank ``src`` (a global rank, as in ``torch.distributed``) only; the
    others pass None. An image that failed on ``src`` fails on every rank with the same
    error. Every rank should use the same server: the others find the images in its L1.
    """
    rank = dist.get_rank()
    box: list[_Shared | None] = [None]
    if rank == src:
        if images is None:
            raise ValueError(f"rank {src} encodes: pass the images")
        results = client.encode(images, timeout)
        box[0] = [(r.digest, r.error.code.name, r.error.message) if r.error else (r.digest, None, "") for r in results]
    dist.broadcast_object_list(box, src=src, group=group)
    if rank != src:
        assert box[0] is not None
        results = _fetch(client, box[0], timeout)
    if device is None:
        return results
    return [replace(r, embeddings=[t.to(device) for t in r.embeddings]) for r in results]


def rank_device(device: str | None, rank: int) -> torch.device | None:
    """This rank's own device for ``device``: a bare ``"cuda"`` is ``cuda:{local rank}``.

    The local rank is ``LOCAL_RANK`` (torchrun sets it), else ``rank`` (processes spawned on one
    host). ``torch.device("cuda")`` would be the current device, GPU 0 in every fresh rank: all
    ranks on one GPU, the very crowding this cache exists to avoid. An explicit index is refused,
    since it would put every rank on that one GPU too.
    """
    if device is None:
        return None
    chosen = torch.device(device)
    if chosen.type != "cuda":
        return chosen
    if chosen.index is not None:
        raise ValueError(f"device {device!r} would put every rank on one GPU: pass 'cuda' (each rank takes its own)")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))


def _fetch(client: VitCacheClient, shared: _Shared, timeout: float | None) -> list[EncodedImage]:
    results: list[EncodedImage] = []
    encoded = [i for i, (_, code, _) in enumerate(shared) if code is None]
    fetched = dict(zip(encoded, client.fetch([shared[i][0] for i in encoded], timeout), strict=True))
    for index, (digest, code, message) in enumerate(shared):
        result = fetched.get(index)
        if result is None:
            failed = ImageFailed(index, grpc.StatusCode[code], message)  # type: ignore[misc]
        elif result.error is not None:
            failed = ImageFailed(index, result.error.code, result.error.message)
        else:
            results.append(replace(result, index=index))
            continue
        results.append(EncodedImage(index, digest, [], (), "", failed))
    return results
