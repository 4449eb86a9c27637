"""The composition root: a :class:`~vitcache.config.VitcacheConfig` in, a ready :class:`EmbeddingEngine` out.

The server and anyone embedding vitcache in process build the same objects the same way: the model's
loader, its encoder process(es) or an in-process pipeline, L1, the Redis tier and the fleet lock.
"""

from __future__ import annotations

from vitcache.cache.arena import SharedArena, shared_arena_bytes
from vitcache.cache.fleet_lock import FleetLock
from vitcache.cache.l1 import L1Cache
from vitcache.cache.tiers import RedisTier, check_redis_url
from vitcache.config import VitcacheConfig
from vitcache.digest import load_digest_key
from vitcache.encode.encoder_pool import EncoderPool, parse_devices, pool_loaders
from vitcache.encode.pipeline import Pipeline, PipelineConfig
from vitcache.engine import EmbeddingEngine, EngineConfig
from vitcache.errors import ConfigError
from vitcache.models.loading import EncoderLoader, VisionEncoder
from vitcache.observer import EngineObserver


async def build_engine(
    config: VitcacheConfig, encoder: VisionEncoder | None = None, observer: EngineObserver | None = None
) -> EmbeddingEngine:
    """The engine ``config`` describes, not started yet (``await engine.start()``).

    Serves ``encoder`` if given; otherwise loads ``config.model`` here, or in one encoder process per
    device (:class:`EncoderPool`, started here: the namespace, and so the L2 keys, is known once the
    model is). Settings an operator can get wrong (the digest key file, the Redis URL, the devices)
    are checked before the model loads, which takes a while.
    """
    security, cache = config.security, config.cache
    digest_key = load_digest_key(security.digest_key_file) if security.digest_key_file else None
    if cache.redis_url:
        check_redis_url(cache.redis_url)
    engine_config = EngineConfig(PipelineConfig(config.batching, config.limits), digest_key)
    pipeline = encoder if encoder is not None else await _pipeline(config, engine_config.pipeline, observer)
    l2 = fleet_lock = None
    if cache.redis_url:
        l2 = RedisTier(
            cache.redis_url,
            pipeline.spec.namespace,
            cache.redis_ttl_s,
            cache.redis_timeout_s,
            cluster=cache.redis_cluster,
        )
        if cache.fleet_lock_ttl_s:
            fleet_lock = FleetLock(l2, cache.fleet_lock_ttl_s)
    # With same-host clients or front-end processes, L1's bytes live in shared memory they map read-only
    # (no copy on a hit).
    shared = config.transport.shm_socket or config.transport.frontends
    arena = SharedArena(shared_arena_bytes(cache.l1_bytes)) if shared else None
    return EmbeddingEngine(pipeline, L1Cache(cache.l1_bytes, arena), l2, engine_config, fleet_lock, observer)


async def _pipeline(
    config: VitcacheConfig, pipeline_config: PipelineConfig, observer: EngineObserver | None
) -> VisionEncoder | Pipeline:
    """The model of ``config``: loaded in this process, or in a started pool of encoder processes."""
    devices = parse_devices(config.model.device)
    # Every batch the batcher makes has its CUDA graph.
    loader = EncoderLoader(config.model, graph_max_patches=config.batching.max_batch_patches).on(devices[0])
    if config.encoder.uses_process(config.model.device):
        pool = EncoderPool(
            pool_loaders(loader, devices),
            pipeline_config,
            observer,
            ring_bytes=config.encoder.encoder_ring_bytes,
            restart_backoff_s=config.encoder.encoder_restart_backoff_s,
        )
        await pool.load()
        return pool
    if len(devices) > 1:
        raise ConfigError(f"--device {config.model.device}: several devices need --encoder-process on (or auto)")
    return loader.load()
