"""Checks of option values that would otherwise fail deep inside torch, transformers, peft or accelerate.

Each takes a value and returns it (normalised where useful) or raises an ATPError naming the flag. Every
command uses these, so a value means the same and fails the same way everywhere.
"""
from __future__ import annotations

from .errors import ATPError

MIXED_PRECISION = ("no", "bf16", "fp16", "auto")
SEED_LIMIT = 2**32  # numpy's seed range; accelerate's set_seed seeds numpy too


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def at_least(value, minimum: int, name: str) -> int:
    if not _is_int(value) or value < minimum:
        raise ATPError(f"{flag(name)} must be a whole number of at least {minimum}, got {value!r}")
    return value


def seed(value, name: str = "seed") -> int:
    if not _is_int(value) or not 0 <= value < SEED_LIMIT:
        raise ATPError(f"{flag(name)} must be a whole number from 0 to {SEED_LIMIT - 1}, got {value!r}")
    return value


def attn_implementation(value, name: str = "attn_implementation") -> str | None:
    """None (the model's default), eager, sdpa, or an installed flash / flex attention."""
    if value is None:
        return None
    from transformers import utils
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    valid = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if not isinstance(value, str) or (value not in valid and "/" not in value):  # org/repo: a hub kernel
        raise ATPError(f"{flag(name)} must be one of {', '.join(valid)} (or a hub kernel org/repo), got {value!r}")
    needs = {"flash_attention_2": ("is_flash_attn_2_available", "the flash-attn package and a CUDA GPU"),
             "flash_attention_3": ("is_flash_attn_3_available", "flash-attn 3 and a Hopper GPU"),
             "flash_attention_4": ("is_flash_attn_4_available", "flash-attn 4 and a recent NVIDIA GPU"),
             "flex_attention": ("is_torch_flex_attn_available", "a torch with flex attention")}
    if value in needs:
        check, what = needs[value]
        if not getattr(utils, check, lambda: False)():
            raise ATPError(f"{flag(name)} {value} needs {what}, which this environment lacks; use sdpa or eager")
    return value


def mixed_precision(value, name: str = "mixed_precision") -> str:
    import torch

    if value not in MIXED_PRECISION:
        raise ATPError(f"{flag(name)} must be one of {', '.join(MIXED_PRECISION)}, got {value!r}")
    if value == "fp16" and not torch.cuda.is_available():
        raise ATPError(f"{flag(name)} fp16 needs a CUDA GPU; on this machine use bf16 or no")
    if value == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ATPError(f"{flag(name)} bf16 is not supported by this GPU; use fp16 or no")
    return value


def lora_targets(value, name: str = "lora_targets") -> list[str]:
    """A non-empty list of module names (q_proj, ...); a single string would be read as a regex by peft."""
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ATPError(f"{flag(name)} must be a non-empty list of module names such as q_proj, v_proj, "
                       f"got {value!r}")
    return [v.strip() for v in value]


def lora_targets_in(model, value, name: str = "lora_targets") -> list[str]:
    """The targets, each of which names linear layers of the model's decoder blocks."""
    import torch

    targets = lora_targets(value, name)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and ".layers." in n})
    unknown = [t for t in targets if t not in linear]
    if unknown:
        raise ATPError(f"{flag(name)} {', '.join(unknown)}: no such linear layer in the model's decoder blocks; "
                       f"they have {', '.join(linear)}")
    return targets


def device(value, name: str = "device"):
    """A torch.device this torch build can use (default: cuda when available, else cpu)."""
    import torch

    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ATPError(f"{flag(name)} {value!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ATPError(f"{flag(name)} {value}: {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ATPError(f"{flag(name)} {value}: there are only {torch.cuda.device_count()} CUDA device(s)")
        return dev
    backend = getattr(torch, dev.type, None) if dev.type != "mps" else getattr(torch.backends, "mps", None)
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        raise ATPError(f"{flag(name)} {value}: this torch build cannot use {dev.type} devices; use cpu or cuda")
    return dev
