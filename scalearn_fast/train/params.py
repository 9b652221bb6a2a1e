"""``scalearn-fast params``: transfer parameters per variant vs AdapterFusion for a local model,
and the bottleneck adapter's budget: its size as a percentage of the model's parameters for
given reduction factors, and the reduction factor that meets given budgets.

The counts come from ``scalearn_fast.models.model_transfer_parameters``; the model is built from
its config on the meta device, so no weights are read.
"""

from __future__ import annotations

from collections.abc import Sequence


def model_on_meta(model_dir: str):
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        return AutoModel.from_config(config)


DEFAULT_BUDGETS = (10.0, 1.0, 0.1)  # percent of the model's parameters


def format_table(
    model,
    num_sources: int,
    reduction_factors: Sequence[float] = (),
    budgets: Sequence[float] = (),
) -> str:
    """The transfer-parameter table; with ``reduction_factors`` or ``budgets`` (percent) also the
    bottleneck adapter's budget lines (``format_budget``)."""
    from ..models.params import model_transfer_parameters
    from ..models.registry import ffn_sites, hidden_size

    counts = model_transfer_parameters(model, num_sources)
    fusion = counts["adapter_fusion"]
    lines = [
        f"model_type={model.config.model_type}  adapter sites L={len(ffn_sites(model))}  "
        f"d={hidden_size(model)}  sources N={num_sources}",
        f"{'method':<20}{'transfer params':>16}{'vs AdapterFusion':>18}",
    ]
    for name, count in counts.items():
        lines.append(f"{name:<20}{count:>16,}{count / fusion:>17.4%}")
    if reduction_factors or budgets:
        lines += ["", *format_budget(model, reduction_factors, budgets)]
    return "\n".join(lines)


def format_budget(model, reduction_factors: Sequence[float], budgets: Sequence[float]) -> list[str]:
    """The adapter budget lines: per reduction factor its bottleneck and % of the model; per
    budget (percent) the largest bottleneck within it and its reduction factor."""
    from ..models.params import adapter_budget, bottleneck_for_budget, source_adapter_parameters
    from ..models.registry import ffn_sites, hidden_size
    from .adapter import bottleneck_size

    sites, d = len(ffn_sites(model)), hidden_size(model)
    total = sum(p.numel() for p in model.parameters())
    lines = [
        f"bottleneck adapter, one per site (L={sites}), vs the model's {total:,} parameters",
        f"{'reduction factor':<20}{'bottleneck r':>14}{'adapter params':>16}{'% of model':>12}",
    ]
    for factor in reduction_factors:
        r = bottleneck_size(d, factor)
        count = source_adapter_parameters(sites, d, r)
        lines.append(f"{factor:<20g}{r:>14}{count:>16,}{adapter_budget(sites, d, r, total):>12.3%}")
    if budgets:
        lines.append(f"{'budget':<20}{'bottleneck r':>14}{'reduction factor':>18}")
    for pct in budgets:
        if not pct > 0:
            raise ValueError(f"budget must be a percentage > 0; got {pct}")
        r = bottleneck_for_budget(sites, d, total, pct / 100)
        factor = f"{d / r:.4g}" if r else "none (r < 1)"
        lines.append(f"{f'{pct:g}%':<20}{r:>14}{factor:>18}")
    return lines
