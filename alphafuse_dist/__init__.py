"""alphafuse-dist: distributed AlphaFuse training."""
__version__ = "0.1.0"
