"""Adapters that plug vitcache's client into inference servers (vLLM, SGLang); they import only the client side."""
