"""The model families: what to load from a checkpoint and how to run its vision tower.

One file per family, named after its checkpoints' ``model_type``, holding a ``ModelFamily`` (``family``)
that ``registry`` lists. ``loading`` reads a checkpoint's vision weights into a ``VisionEncoder`` and
derives its cache namespace; ``preprocess`` reproduces the HF image processors in torch, ``video`` runs
the family's own video processor; ``accel`` and ``graphs`` are the CUDA fast path; ``tiny`` makes the
``tiny-random`` checkpoints. ``vitcache.encode`` runs what is here; nothing here knows the cache.
"""
