"""Knowledge distillation from the dense model: the student (masked, LoRA-tuned) matches the teacher's
next-token distributions on the same batch, mixed with the task loss.

    loss = (1 - w) * task + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))

averaged over the batch's real (non-padding) positions, prompt tokens included: every position carries a
soft target, which is denser than the task loss on the response alone.

Teachers:
  self       the model being pruned with its LoRA adapters disabled and every gate open, i.e. the dense
             pretrained model: no extra memory, one extra forward pass without gradients;
  RUN_DIR    a dense + LoRA run on the same domain (`atp prune --no-prune`), loaded from RUN_DIR/model:
             Minitron's "teacher correction", a teacher that already knows the domain.

With --distill-top-k K the KL is over the teacher's top K tokens and one bucket for the rest of its mass
(topk_kd_loss), from targets computed once and cached on disk (atp.teacher_cache).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import ATPError


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
            temperature: float = 1.0, tokens: int | None = None) -> torch.Tensor:
    """T^2 * KL(teacher || student) per position, summed over mask and divided by `tokens` (default: the
    mask's count; give the global batch's count to normalise across processes as the task loss does)."""
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_position = (teacher.exp() * (teacher - student)).sum(dim=-1)
    mask = mask.to(per_position.dtype)
    count = tokens if tokens is not None else mask.sum().clamp_min(1.0)
    return (per_position * mask).sum() / count * (t * t)


def topk_kd_loss(student_logits: torch.Tensor, targets, mask: torch.Tensor, temperature: float = 1.0,
                 tokens: int | None = None) -> torch.Tensor:
    """kd_loss over k + 1 buckets (atp.teacher_cache.TopK targets): the teacher's top-k tokens and the rest of its
    mass, against the student's probabilities of those tokens and of all others. Equal to kd_loss when k is the
    vocabulary size; the same temperature, T^2 scaling, mask and token normalisation."""
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    student_top = student.gather(-1, targets.ids)
    # log(1 - sum of the student's top-k probabilities), clamped where that mass rounds to nothing
    student_rest = torch.log((-torch.expm1(student_top.logsumexp(dim=-1))).clamp_min(1e-30))
    teacher_top, teacher_rest = targets.logprobs.float(), targets.rest.float()
    rest_mass = teacher_rest.exp()
    rest_log = torch.where(rest_mass > 0, teacher_rest, torch.zeros_like(teacher_rest))  # no 0 * -inf
    per_position = ((teacher_top.exp() * (teacher_top - student_top)).sum(dim=-1)
                    + rest_mass * (rest_log - student_rest))
    mask = mask.to(per_position.dtype)
    count = tokens if tokens is not None else mask.sum().clamp_min(1.0)
    return (per_position * mask).sum() / count * (t * t)


class SelfTeacher:
    """The dense pretrained model inside the peft model: adapters disabled, gates open (no extra memory)."""

    name = "self"

    def __init__(self, peft_model, gates_off):
        self.peft_model, self.gates_off = peft_model, gates_off

    @torch.no_grad()
    def logits(self, batch: dict) -> torch.Tensor:
        adapters_off = getattr(self.peft_model, "disable_adapter", None)
        with self.gates_off(), (adapters_off() if adapters_off else contextlib.nullcontext()):
            return self.peft_model(**model_inputs(batch)).logits


class ModelTeacher:
    """A separate model (a dense + LoRA run's export), frozen, in eval mode."""

    def __init__(self, model, name: str):
        self.model, self.name = model.eval().requires_grad_(False), name

    @classmethod
    def from_run(cls, run_dir: str, device, vocab_size: int) -> ModelTeacher:
        from .models import load_model

        path = Path(run_dir)
        model_dir = path / "model" if (path / "model").is_dir() else path
        if not (model_dir / "config.json").exists():
            raise ATPError(f"--teacher {run_dir}: no model there; give a run directory made by "
                           "`atp prune --no-prune` (its model/ folder) or a model folder")
        model, _ = load_model(str(model_dir))
        if model.config.vocab_size != vocab_size:
            raise ATPError(f"--teacher {run_dir}: its vocabulary has {model.config.vocab_size} tokens, the model "
                           f"being pruned has {vocab_size}; the teacher must share the tokenizer")
        return cls(model.to(device), str(run_dir))

    @torch.no_grad()
    def logits(self, batch: dict) -> torch.Tensor:
        return self.model(**model_inputs(batch)).logits


def model_inputs(batch: dict) -> dict:
    """The batch's inputs without its labels. A packed batch has position_ids and no attention_mask, and with a
    cache transformers would not read its example boundaries: no cache."""
    return {**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}, "use_cache": False}
