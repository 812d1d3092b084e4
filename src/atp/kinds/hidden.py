"""Hidden (embedding) channels in blocks of `hidden_block`, Minitron's embedding-channel pruning: one row of gates
for the whole model. A pruned channel goes from the embeddings, every projection that reads or writes the residual
stream (columns of q/k/v/gate/up, rows and bias entries of o/down), every norm over hidden_size and the LM head: the
export has a smaller hidden_size. Counts: every other count is linear in hidden_size, so the space counts with the
kept channels in its place (the "hidden_size" factor).

Masked forward, the same in every mask mode: whatever writes the residual stream (the embedding, and o_proj /
down_proj at their peft wrapper, so both paths and their biases) has its pruned channels zeroed, so they stay zero in
the stream. Every RMSNorm over hidden_size (the layers' norms, Gemma 3's extra ones, the final norm) must then
normalise over the k kept channels, sum(x^2) / k, not over hidden_size as a plain mask would: its input (pruned
channels zeroed) is scaled by sqrt(hidden_size / k) before it and its output divided by the same factor after it,
which is exactly that norm, for any RMSNorm (Gemma's 1 + weight included). Readers (q/k/v, gate/up, the LM head) get
a norm's output, zero on pruned channels, so they read only kept channels. The norms (frozen weights) cut a pruned
channel in every mask mode, so its LoRA pieces get no gradient and group lasso drives them to zero.

Export: the kept channels of the embeddings, LM head, final norm and every layer norm (the projections are sliced
by `slices`). Gemma scales its embedding by sqrt(hidden_size): the smaller model scales by sqrt(kept), so the kept
embedding columns are multiplied by sqrt(hidden_size / kept); with tied embeddings the LM head shares them, so the
final norm's (1 + weight) is divided by the same factor, which gives the same logits with the tie kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ATPError
from .base import MASK_MODES, GateKind, as_float, chunk_sums, option


@dataclass
class HiddenOptions:
    hidden_block: int = option(32, "hidden channels per gate with --space hidden (the kept hidden size is a multiple "
                                   "of it, or the full size; q8_0 / q4_0 GGUF files need multiples of 32)",
                               at_least=1, before=32, inert_unless_selected=True)
    protect_outliers: float = option(100.0, "with --space hidden, for the generator (atp, frozen-generator): a hidden "
                                            "block holding a massive activation (a channel whose peak |residual| on "
                                            "the calibration examples is at least this many times the median "
                                            "channel's) is never pruned; 0 turns the guard off",
                                     at_least=0, before=0.0, inert_unless_selected=True)


class HiddenKind(GateKind):
    name = "hidden"
    description = ("hidden (embedding) channels in blocks of --hidden-block, one set shared by the embeddings, every "
                   "layer, every norm and the LM head (the export has a smaller hidden size)")
    options = HiddenOptions
    space_options = {"hidden_block": 1}
    model_wide = True
    min_kept = 1
    unsupported_methods = {"activation": "Wanda-sp scores read the inputs of o_proj / down_proj, which say nothing "
                                         "about hidden channels; use taylor, magnitude, random or frozen-generator"}
    hooks = {mode: () for mode in MASK_MODES}  # the residual-stream hooks are `extra_hooks`
    readers = ("q", "k", "v", "gate", "up")  # the projections whose input columns are hidden channels
    writers = ("o", "down")  # those whose output rows (and bias entries) are
    lora_pieces = (tuple(("hidden", role, "A", 1) for role in readers)
                   + tuple(("hidden", role, "B", 0) for role in writers))
    score_roles = readers + writers

    @staticmethod
    def num_blocks(space) -> int:
        return math.ceil(space.hidden_size / space.hidden_block)

    def width(self, space):
        return self.num_blocks(space)

    def channel_mask(self, space, gates: torch.Tensor) -> torch.Tensor:
        """Expand [..., blocks] hidden gates to [..., hidden_size] channel gates."""
        return gates.repeat_interleave(space.hidden_block, dim=-1)[..., : space.hidden_size]

    def check_space(self, space):
        if not space.arch.rms_norms:
            raise ATPError(f"--space hidden needs RMSNorm everywhere on the residual stream (norms are renormalised "
                           f"over the kept channels); {space.arch.label} models are not supported")
        if self.num_blocks(space) < 2:
            raise ATPError(f"--hidden-block {space.hidden_block} puts all {space.hidden_size} hidden channels in one "
                           "block, which must stay: nothing could be pruned; choose a smaller --hidden-block")

    def factors(self, space, gates):
        return {"hidden_size": self.channel_mask(space, as_float(gates)).sum()}

    def masks(self, space, gates, names):
        channels = self.channel_mask(space, gates)  # [1, hidden_size]
        # a norm over the k kept channels is the dense norm of the input scaled by sqrt(hidden_size / k)
        return {"hidden": channels, "hidden_scale": torch.sqrt(space.hidden_size / channels.sum().clamp_min(1))}

    def extra_hooks(self, space, model, masks_of):
        return register_hooks(space, model, masks_of)

    def groups(self, space):
        return {"hidden": (self.num_blocks(space), space.hidden_block)}  # per layer: its own LoRA pieces

    def pruned(self, space, gates):
        return {"hidden": (1 - gates.detach()).expand(space.num_layers, -1)}

    def kept(self, space, gate_row):
        channels = torch.nonzero(self.channel_mask(space, gate_row) > 0.5).flatten().tolist()
        return {"hidden": None if len(channels) == space.hidden_size else channels}

    def slices(self, kept, head_dim):
        if kept.get("hidden") is None:
            return {}
        channels = torch.tensor(kept["hidden"], dtype=torch.long)
        return {**{role: (None, channels) for role in self.readers},
                **{role: (channels, None) for role in self.writers}}

    def export_config(self, kept_structure):
        channels = kept_structure[0].get("hidden") if kept_structure else None
        return {} if channels is None else {"hidden_size": len(channels)}

    def export_record(self, kept_structure):
        channels = kept_structure[0].get("hidden") if kept_structure else None
        return {} if channels is None else {"kept_hidden": channels}

    def slice_outside(self, state, kept_structure, arch, config):
        channels = kept_structure[0].get("hidden") if kept_structure else None
        if channels is not None:
            slice_outside(state, channels, arch, config)

    def finish_export(self, pruned, dense_config, arch):
        if pruned.config.hidden_size != dense_config.hidden_size:
            reset_embed_scale(pruned, arch)

    def gguf_steps(self, cfg):
        return [(cfg.hidden_block, f"hidden sizes in steps of {cfg.hidden_block} (--hidden-block)")]

    def protect(self, space, model, rows, cfg):
        if cfg.protect_outliers <= 0:
            return None
        keep = outlier_blocks(space, model, rows, cfg.protect_outliers)
        blocks = torch.nonzero(keep[0]).flatten().tolist()
        return keep, (f"hidden blocks kept for their massive activations (--protect-outliers "
                      f"{cfg.protect_outliers:g}): {blocks}")

    def group_sums(self, space, stats):
        columns = sum(stats[role].sum(0) for role in self.readers) + sum(stats[role].sum(1) for role in self.writers)
        return chunk_sums(columns, space.hidden_block)
def stream_modules(space, model):
    """(module, what) for the hooks: "write" for the embedding and each layer's o_proj / down_proj, "norm" for every
    norm over hidden_size. `model` is the transformers CausalLM (with peft's wrappers inside, if any)."""
    arch = space.arch
    yield model.get_submodule(arch.embed), "write"
    for layer in arch.decoder_layers(model):
        for role in ("o", "down"):
            yield arch.projection(layer, role), "write"
        for name in arch.norms:
            yield layer.get_submodule(name), "norm"
    yield model.get_submodule(arch.final_norm), "norm"


def check_norm(module) -> None:
    if "RMSNorm" not in type(module).__name__ or getattr(module, "bias", None) is not None:
        raise ATPError(f"--space hidden renormalises RMSNorms over the kept channels, but this model has a "
                       f"{type(module).__name__} on its residual stream; its hidden channels cannot be pruned")


def register_hooks(space, model, masks_of) -> list:
    """Forward hooks for hidden channels; `masks_of()` gives the current masks (None: no masking). Returns handles."""
    def write(module, args, output):
        masks = masks_of()
        if masks is None:
            return None
        return output * masks["hidden"][0].to(output.dtype)

    def norm_input(module, args):
        masks = masks_of()
        if masks is None:
            return None
        x = args[0]
        return (x * (masks["hidden"][0] * masks["hidden_scale"]).to(x.dtype),) + tuple(args[1:])

    def norm_output(module, args, output):
        masks = masks_of()
        if masks is None:
            return None
        return output / masks["hidden_scale"].to(output.dtype)

    handles = []
    for module, what in stream_modules(space, model):
        if what == "write":
            handles.append(module.register_forward_hook(write))
        else:
            check_norm(module)
            handles += [module.register_forward_pre_hook(norm_input), module.register_forward_hook(norm_output)]
    return handles


@torch.no_grad()
def outlier_blocks(space, model, rows: list[list[int]], factor: float) -> torch.Tensor:
    """[1, hidden blocks], 1 where a block holds a massive activation: a channel whose peak |residual stream| over
    `rows` (token ids, one sequence each) and every layer is at least `factor` times the median channel's peak.
    Such channels act as fixed biases the model cannot do without (Sun et al. 2024, "Massive Activations in Large
    Language Models"); SmolLM2-135M has one, at about 300 times the median."""
    device = next(model.parameters()).device
    training, peak = model.training, None
    model.eval()
    for ids in rows:
        states = model(input_ids=torch.tensor([ids], device=device), output_hidden_states=True).hidden_states
        # the last state has been through the final norm: the residual stream is the ones before it
        now = torch.stack([state[0].float().abs().amax(0) for state in states[:-1]]).amax(0).cpu()
        peak = now if peak is None else torch.maximum(peak, now)
    model.train(training)
    massive = (peak >= factor * peak.median()).float()
    return (chunk_sums(massive, space.hidden_block) > 0).float().unsqueeze(0)


def slice_outside(state: dict, channels: list[int], arch, config) -> None:
    """Keep `channels` of the embeddings, LM head, final norm and every layer norm in `state` (in place); fold Gemma's
    embedding scale (see the module docstring)."""
    index = torch.tensor(channels, dtype=torch.long)
    norms = [f"{arch.layers}.{i}.{name}.weight" for i in range(config.num_hidden_layers) for name in arch.norms]
    for key in [*norms, f"{arch.final_norm}.weight"]:
        if key in state:  # a removed block's norms are gone
            state[key] = state[key].index_select(0, index.to(state[key].device)).clone()
    embed, final = f"{arch.embed}.weight", f"{arch.final_norm}.weight"
    for key in (embed, f"{arch.lm_head}.weight"):
        if key in state:
            state[key] = state[key].index_select(1, index.to(state[key].device)).clone()
    if arch.embed_scale:
        factor = (config.hidden_size / len(channels)) ** 0.5
        state[embed] = state[embed] * factor
        if config.tie_word_embeddings:
            state[final] = (arch.norm_offset + state[final]) / factor - arch.norm_offset


def reset_embed_scale(pruned, arch) -> None:
    """A scaled embedding of the smaller model scales by sqrt(its hidden_size), as it does when loaded."""
    if arch.embed_scale:
        embedding = pruned.get_submodule(arch.embed)
        value = embedding.embed_scale
        embedding._buffers["embed_scale"] = torch.tensor(pruned.config.hidden_size ** 0.5, dtype=value.dtype,
                                                         device=value.device)
