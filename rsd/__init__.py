"""rsd: Residual-FSQ action tokens with speculative decoding, validated on LIBERO."""

from rsd.config import RSDConfig

__version__ = "0.1.0"

__all__ = ["RSDConfig", "__version__"]
