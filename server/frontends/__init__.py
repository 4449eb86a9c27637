"""The engine process's side of ``--frontends``: the link its gRPC front-end processes call the engine over.

Why front-ends: one Python process moves about 450 results of 1.8 MB a second over gRPC (an H200 host,
448x448); two GPUs compute more. Several front-end processes share the gRPC port (SO_REUSEPORT: the
kernel spreads connections over them) and do the per-request work there: HTTP/2, parsing, checks and
serializing results. The engine, with the one L1 of the host, single flight, Redis, the fleet lock and
the encoders, stays in one process, which sees each image as one small message.

Frames over a unix socket in a 0700 directory: an 8-byte little-endian length, then a pickle. Both ends
are this server's own processes (each connection first proves, in raw bytes, the secret the front-ends
got when they were started; nothing is unpickled before), so pickle is safe here; clients never reach
this socket. Entry bytes do not cross it: an entry in the shared L1 arena travels as its place there
(:class:`ArenaRef`), and the engine keeps it (so its block is not reused) until the front-end has built
its reply and releases it.

Front-end -> engine: the secret, its index and its pid (``LinkAddress.hello``, raw bytes), then
``("call", id, method, args)``, ``("cancel", id)``, ``("release", pins)``, ``("rpcs", events)`` (request metrics: the
engine's /metrics counts them) and
``("serving",)`` once its gRPC port is bound. Engine -> front-end: ``("welcome", served model, serving, arena size)``
with the arena's memfd (SCM_RIGHTS), then ``("outcome", id, outcome, ref)``, ``("end", id, value or error)``
and ``("health", serving)``.
"""
