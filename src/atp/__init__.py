"""atp: all-in-one tuning and structural pruning for domain-specific LLMs."""
from .errors import ATPError

__version__ = "0.1.0"
__all__ = ["ATPError", "__version__", "load_pruned"]


def __getattr__(name):
    if name == "load_pruned":  # imported lazily so that `atp --help` stays fast
        from .export import load_pruned

        return load_pruned
    raise AttributeError(f"module 'atp' has no attribute {name!r}")
