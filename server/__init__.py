"""The vitcache gRPC server: ``vitcache serve``."""
