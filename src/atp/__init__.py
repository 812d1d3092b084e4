"""atp: all-in-one tuning and structural pruning for domain-specific LLMs.

Importing atp registers its pruned model types with transformers' Auto classes, so heterogeneous
exports load with `AutoModelForCausalLM.from_pretrained(path)` and no remote code.
"""
import logging as _logging

from .arch import register as _register
from .errors import ATPError
from .export import load_pruned

__version__ = "0.1.0"
__all__ = ["ATPError", "__version__", "load_pruned"]

_register()
# bitsandbytes (imported by peft) warns at import that an optional kernel from the Hugging Face hub is not trusted;
# its own CPU kernels run instead, so the warning says nothing about a run
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
