"""ScribbleGen engine: turn a small scribble-labelled set into a large tagged synthetic set.

This package is deliberately light at import time: ``seg`` imports the shard and
manifest modules from here, and must not pay for diffusers or Ray when it does.
"""

__version__ = "0.1.0"
