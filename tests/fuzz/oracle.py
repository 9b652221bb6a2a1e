"""An independent oracle for the fuzz suite: every public op and layer as a plain per-source loop.

Written from the formulas in docs/design.md and the public docstrings, without importing
``scalearn_fast.ops.reference`` or anything else from the package, so a mistake shared by the
package's own reference loop and its fast backends still shows. Every matrix product is an
elementwise product followed by a sum (``_matvec``), never a BLAS call, so non-finite values
follow IEEE rules term by term, as a hand-written loop would. Plain autograd differentiates it
(also twice, for the double-backward check).

All functions compute in ``dtype`` (float64 by default: the oracle) and also run in a lower
dtype, which gives the error a loop in that dtype makes (the baseline of the tolerance rule).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

F64 = torch.float64


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return F.relu(x)
    if name == "gelu":
        return F.gelu(x)  # the exact (erf) form
    if name == "silu":
        return x * torch.sigmoid(x)
    if name == "tanh":
        return torch.tanh(x)
    if name == "identity":
        return x
    raise KeyError(name)


def _matvec(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [..., k] · weight[o, k]ᵀ -> [..., o]``, as a sum of elementwise products."""
    return (x.unsqueeze(-2) * weight).sum(-1)


def as_list(value: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-source tensors from a stacked tensor (first dim N) or a list."""
    return list(value.unbind(0)) if isinstance(value, torch.Tensor) else list(value)


def adapter_outputs(z, w_down, b_down, w_up, b_up, act: str, dtype=F64) -> list[torch.Tensor]:
    """``A_i(z) = W_up_i · act(W_down_i · z + b_down_i) + b_up_i`` for each source, in ``dtype``."""
    z = z.to(dtype)
    outs = []
    for wd, bd, wu, bu in zip(as_list(w_down), as_list(b_down), as_list(w_up), as_list(b_up), strict=True):
        hidden = activation(act, _matvec(z, wd.to(dtype)) + bd.to(dtype))
        outs.append(_matvec(hidden, wu.to(dtype)) + bu.to(dtype))
    return outs


def scaled_adapter_sum(
    z, w_down, b_down, w_up, b_up, omega, residual=None, *, activation="relu", row_scale=None, dtype=F64
) -> torch.Tensor:
    """``Σ_i ω_i ⊙ (row_scale[..., i] · A_i(z)) + residual`` for ``z [..., d]``."""
    total = None
    for i, a in enumerate(adapter_outputs(z, w_down, b_down, w_up, b_up, activation, dtype)):
        if row_scale is not None:
            a = a * row_scale.to(dtype)[..., i : i + 1]
        term = omega.to(dtype)[i] * a
        total = term if total is None else total + term
    if residual is not None:
        total = total + residual.to(dtype)
    return total


def adapter_fusion(
    z,
    w_down,
    b_down,
    w_up,
    b_up,
    query_weight,
    query_bias,
    key_weight,
    key_bias,
    value_weight,
    residual=None,
    *,
    query_input=None,
    scaling=1.0,
    temperature=1.0,
    score_mask=None,
    residual_before=False,
    activation="relu",
    dtype=F64,
) -> torch.Tensor:
    """AdapterFusion as the `adapters` library's ``BertFusion``: per source the (scaled) adapter
    output, plus the residual under ``residual_before``, is both key and value; the scores
    ``q·k_i`` (times ``score_mask``, the dropout mask already divided by 1 - p) are divided by
    the temperature and soft-maxed over sources; out = Σ p_i W_v e_i (+ residual after)."""
    n = len(as_list(w_down))
    if isinstance(scaling, torch.Tensor):
        s = scaling.to(dtype)
        s = s.reshape(n, -1) if s.dim() != 0 else s.expand(n).reshape(n, 1)
    else:
        s = torch.full((n, 1), float(scaling), dtype=dtype)
    rho = None if residual is None else residual.to(dtype)
    entries = []
    for i, a in enumerate(adapter_outputs(z, w_down, b_down, w_up, b_up, activation, dtype)):
        a = s[i] * a
        entries.append(a + rho if residual_before else a)
    c = (z if query_input is None else query_input).to(dtype)
    q = c if query_weight is None else _matvec(c, query_weight.to(dtype))
    if query_bias is not None:
        q = q + query_bias.to(dtype)
    scores = []
    for e in entries:
        k = e if key_weight is None else _matvec(e, key_weight.to(dtype))
        if key_bias is not None:
            k = k + key_bias.to(dtype)
        scores.append((q * k).sum(-1))
    sc = torch.stack(scores, -1)  # [..., N]
    if score_mask is not None:
        sc = sc * score_mask.to(dtype).reshape(sc.shape)
    sc = sc / temperature
    ex = torch.exp(sc - sc.max(-1, keepdim=True).values)
    probs = ex / ex.sum(-1, keepdim=True)
    out = None
    for i, e in enumerate(entries):
        v = e if value_weight is None else _matvec(e, value_weight.to(dtype))
        term = probs[..., i : i + 1] * v
        out = term if out is None else out + term
    if rho is not None and not residual_before:
        out = out + rho
    return out


def layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm, dtype=F64) -> torch.Tensor:
    """``ln(x)`` written out: (x - mean) / sqrt(var + eps) · weight + bias, in ``dtype``."""
    x = x.to(dtype)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + ln.eps)
    if ln.weight is not None:
        y = y * ln.weight.to(dtype)
    if ln.bias is not None:
        y = y + ln.bias.to(dtype)
    return y
