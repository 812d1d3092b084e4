"""atp: all-in-one tuning and structural pruning for domain-specific LLMs.

Importing atp registers its pruned model types with transformers' Auto classes, so heterogeneous
exports load with `AutoModelForCausalLM.from_pretrained(path)` and no remote code.
"""
from .arch import register as _register
from .errors import ATPError
from .export import load_pruned

__version__ = "0.1.0"
__all__ = ["ATPError", "__version__", "load_pruned"]

_register()
