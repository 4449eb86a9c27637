"""The device side of a miss, once L1 and L2 have missed.

``decode`` and ``video_decode`` turn files into pixels within the decoded-pixel ``budget``; the
family's preprocessing makes pixel values; ``batch`` packs misses of many requests into one vision
forward and ``split`` copies its outputs to the host. ``pipeline`` (and ``video_pipeline``) run
these in this process; ``encoder_process`` runs a pipeline in a child process that owns the device,
``encoder_pool`` one such process per device. The engine sees any of them as a ``Pipeline``.
"""
