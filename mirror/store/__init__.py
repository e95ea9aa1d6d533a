"""The cache's storage: blob files, metadata and tiers (layout.py draws what is where on
disk). `mirror.cache.open_cache` opens it all."""
