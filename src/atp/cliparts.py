"""What the `prune` and `demo` commands share (atp.cli and atp.demo both import it): an ATPConfig option's help
text and the summary printed after a prune."""
from __future__ import annotations

import dataclasses


def config_help(name: str) -> str:
    """The --help text of an ATPConfig field, for commands that take the same option."""
    from .options import ATPConfig

    return next(f.metadata["help"] for f in dataclasses.fields(ATPConfig) if f.name == name)


def print_prune_report(report: dict) -> None:
    """Parameters exported, sparsity reached, the logits check and where the model went."""
    check = report.get("logits_check", {})
    print(
        f"exported {report['exported_params']:,} of {report['dense_params']:,} parameters: "
        f"sparsity {report['prunable_sparsity']:.4f} over prunable parameters, {report['model_sparsity']:.4f} over "
        f"the whole model (target {report['target_sparsity']} of the {report.get('sparsity_of', 'prunable')} "
        "parameters)"
    )
    if check:
        print(f"logits check: max |diff| {check['max_abs_logit_diff']:.2e} (allowed {check['allowed']:.2e}) "
              f"{'passed' if check['passed'] else 'FAILED'}")
    print(f"training {report['train_seconds']:.0f}s; model saved to {report['model_dir']}")
