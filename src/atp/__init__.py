"""atp: all-in-one tuning and structural pruning for domain-specific LLMs."""
from .errors import ATPError

__version__ = "0.1.0"
__all__ = ["ATPError", "__version__"]
