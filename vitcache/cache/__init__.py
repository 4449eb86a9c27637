"""Where a looked-up image is answered from before anything is computed.

``entry`` is one cached image or video and its checksummed Redis value; ``l1`` the in-process LRU
bounded by payload bytes, whose bytes ``arena`` can hold in memory same-host clients map read-only;
``tiers`` the shared Redis L2; ``fleet_lock`` lets one replica of a fleet compute a miss while the
others wait for its L2 value. The engine looks here first and stores here last; nothing here knows
models or devices.
"""
