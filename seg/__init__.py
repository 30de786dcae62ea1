"""Segmentation on ScribbleGen shards: streaming, λ-aware sampling, models, training, evaluation.

Shares only the shard format and the manifest with the generator (``engine.shards``,
``engine.manifest``, ``engine.config``, ``engine.errors``); never imports the generator.
"""
