"""Independent implementations used as oracles in tests (NumPy only, no torch)."""

from .numpy_forward import encode_image_numpy, encode_text_numpy

__all__ = ["encode_image_numpy", "encode_text_numpy"]
