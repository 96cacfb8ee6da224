"""clipforge: a complete, fast, practical CLIP system."""
__version__ = "0.1.0"
