"""vitcache: a per-image ViT embedding cache for vision-language model serving.

This package is the library: hashing, preprocessing, model adapters, cache tiers and the
batcher. It never imports gRPC; the server (``vitcache.server``) and the client
(``vitcache.client``) live in their own folders.
"""

__version__ = "0.1.0"
