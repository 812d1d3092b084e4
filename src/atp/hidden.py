"""Hidden-channel pruning (`--space hidden`, the gate kind `kinds.HiddenKind`): the masked forward on the residual
stream, and the export's slicing outside the decoder layers.

Masked forward, the same in every mask mode: whatever writes the residual stream (the embedding, and o_proj /
down_proj at their peft wrapper, so both paths and their biases) has its pruned channels zeroed, so they stay zero in
the stream. Every RMSNorm over hidden_size (the layers' norms, Gemma 3's extra ones, the final norm) must then
normalise over the k kept channels, sum(x^2) / k, not over hidden_size as a plain mask would: its input (pruned
channels zeroed) is scaled by sqrt(hidden_size / k) before it and its output divided by the same factor after it,
which is exactly that norm, for any RMSNorm (Gemma's 1 + weight included). Readers (q/k/v, gate/up, the LM head) get
a norm's output, zero on pruned channels, so they read only kept channels.

Export: the kept channels of the embeddings, LM head, final norm and every layer norm (the projections are sliced
by the kind's `slices`). Gemma scales its embedding by sqrt(hidden_size): the smaller model scales by sqrt(kept), so
the kept embedding columns are multiplied by sqrt(hidden_size / kept); with tied embeddings the LM head shares them,
so the final norm's (1 + weight) is divided by the same factor, which gives the same logits with the tie kept.
"""
from __future__ import annotations

import torch

from .errors import ATPError
from .kinds import chunk_sums


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
