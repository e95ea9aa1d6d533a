"""Eviction: the policies as data (policy.py), the passes that apply them to the tiers
(passes.py, retention.py) and the background evictor (evictor.py). Never calls HTTP."""
