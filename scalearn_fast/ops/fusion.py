"""``adapter_fusion``: the `adapters` library's AdapterFusion over N frozen bottleneck adapters.

Exact semantics (``adapters`` 1.3: ``BertFusion.forward`` fed by ``BottleneckLayer.compose_fuse``).
Per token t, with z_t the adapter input (``LN(h + x)``), c_t the query input (z_t, or h_t when
the config has ``query_before_ln``), ρ_t the residual (h_t for Pfeiffer adapters, whose
``residual_before_ln=True``), s_i the adapters' ``scaling`` (1.0 for Pfeiffer):

    a_ti = s_i ⊙ (W_up_i · act(W_down_i · z_t + b_down_i) + b_up_i)   # the adapter's ``up``:
                                              # no residual, before the adapter's own dropout
    e_ti = a_ti + ρ_t   if residual_before else a_ti    # keys AND values (the library adds ρ
                                              # in place to the one tensor it passes as both)
    q_t  = W_q · c_t + b_q                    # identity when the config has query=False
    k_ti = W_k · e_ti + b_k                   # identity when key=False
    σ_ti = q_t · k_ti
    σ̃_t  = dropout_p(σ_t)                     # training only: on the SCORES, before the
                                              # softmax, one Bernoulli mask over [T, N], 1/(1-p)
    p_t  = softmax_i(σ̃_t / τ)                 # τ = 1, or the library's annealed temperature
    out_t = Σ_i p_ti · W_v e_ti  (+ ρ_t unless residual_before)   # W_v: no bias; absent when
                                              # value=False. value_before_softmax only changes
                                              # where the library applies W_v (same math).

The ``reference`` backend is that loop, materialising every a_ti (the oracle). The fast
backends (``torch``, ``triton``) use the rewrites of DESIGN.md §2 and never form an
[N, T, d] tensor. With U = [diag(s_1)·W_up_1 … diag(s_N)·W_up_N] (d x R), C_i = s_i ⊙ b_up_i,
S = act(z·Dᵀ + b_D) (T x R) and u_t = W_kᵀ q_t:

    R1  Σ_i p_ti W_v e_ti = W_v (Σ_i p_ti e_ti): W_v after the weighted sum, one GEMM.
        Exact (linear, no bias), with or without dropout. Under residual_before
        Σ_i p_ti e_ti = Σ_i p_ti a_ti + ρ_t because Σ_i p_ti = 1.
    R2  σ_ti = u_t · a_ti + γ_t with γ_t = q_t · b_k (+ u_t · ρ_t under residual_before), the
        same for every adapter. Without score dropout softmax is shift invariant, so γ is
        dropped: exact, and its gradient (Σ_i ∂L/∂σ_ti = 0) is exactly zero, which the op
        returns for b_k. WITH dropout the mask multiplies each σ_ti separately and γ no longer
        cancels, so in training with p > 0 the fast backends add γ_t ([T], one dot product per
        token) before the mask. The result is then exact in training too.
    R3  u_t · a_ti = Σ_k (u_t·U)[i·r+k] · S[t, i·r+k] + u_t · C_i: scores through one GEMM
        Π = u·U of width R = N·r, a block row-sum of S ⊙ Π, and a [T, d] x [d, N] product.
    R4  Σ_i p_ti a_ti = (S ⊙ p_t[src(·)])·Uᵀ + p_t·C: the softmax weights fold into S before
        the up GEMM, i.e. the core op ``scaled_adapter_sum_packed(..., row_scale=p)`` (which
        recomputes S: one extra T·d·R GEMM). With nothing to differentiate, the torch backend
        instead scales the scores' S in place and runs the up GEMM itself (S computed once).

Dropout draws its mask with ``F.dropout`` on the [T, N] score matrix in every backend, as the
library does on its [B, S, N] scores: under the same RNG state all three backends (and the
library) drop the same entries. Gradients flow to z, the query input, the residual, the query,
key and value weights, and (if they require grad) the sources and the scaling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backends import resolve_backend
from .packing import PackedSources, TensorOrList, check_activation, check_inputs, pack_sources
from .reference import activation_fn
from .scaled_adapter_sum import scaled_adapter_sum_packed


def _shape(t: torch.Tensor) -> str:
    return f"[{', '.join(str(s) for s in t.shape)}]"


def _check_tensor(name: str, t: torch.Tensor | None, shape: tuple[int, ...], z: torch.Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor or None; got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {_shape(t)}, expected {list(shape)} (d = z.shape[-1])")
    if t.dtype != z.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but z has dtype {z.dtype}; cast with .to({z.dtype})")
    if t.device != z.device:
        raise ValueError(f"{name} is on {t.device} but z is on {z.device}; move them to one device")


def scaling_as_omega(
    scaling: float | torch.Tensor, packed: PackedSources, like: torch.Tensor
) -> torch.Tensor:
    """The adapters' output ``scaling`` as the core op's ω: ``[N, 1]`` or ``[N, d]``."""
    n, d = packed.num_sources, packed.hidden_size
    if not isinstance(scaling, torch.Tensor):
        return like.new_full((n, 1), float(scaling))
    if scaling.dim() == 0:
        return scaling.to(like.dtype).expand(n, 1)
    if scaling.dim() == 1 and scaling.shape[0] == n:
        return scaling.reshape(n, 1)
    if scaling.dim() == 2 and scaling.shape[0] == n and scaling.shape[1] in (1, d):
        return scaling
    raise ValueError(
        f"scaling has shape {_shape(scaling)}, expected a float, [N={n}], [N={n}, 1] or [N={n}, d={d}]"
    )


def _check_fusion_inputs(
    z, query_input, residual, query_weight, query_bias, key_weight, key_bias, value_weight,
    temperature, dropout_p, residual_before,
) -> None:  # fmt: skip
    d = z.shape[-1]
    for name, t, shape in (
        ("query_weight", query_weight, (d, d)),
        ("query_bias", query_bias, (d,)),
        ("key_weight", key_weight, (d, d)),
        ("key_bias", key_bias, (d,)),
        ("value_weight", value_weight, (d, d)),
    ):
        _check_tensor(name, t, shape, z)
    if query_bias is not None and query_weight is None:
        raise ValueError("query_bias was given without query_weight (query=False has no bias)")
    if key_bias is not None and key_weight is None:
        raise ValueError("key_bias was given without key_weight (key=False has no bias)")
    if query_input is not None:
        _check_tensor("query_input", query_input, tuple(z.shape), z)
    if residual_before and residual is None:
        raise ValueError("residual_before=True adds the residual to keys and values; pass residual")
    if not isinstance(temperature, float | int) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number; got {temperature!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p!r}")


def _linear(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    return x if weight is None else F.linear(x, weight, bias)


def adapter_fusion_reference(
    z: torch.Tensor,
    packed: PackedSources,
    query_weight: torch.Tensor | None,
    query_bias: torch.Tensor | None,
    key_weight: torch.Tensor | None,
    key_bias: torch.Tensor | None,
    value_weight: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    *,
    query_input: torch.Tensor | None = None,
    scaling: torch.Tensor,
    temperature: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = False,
    residual_before: bool = False,
    activation: str = "relu",
) -> torch.Tensor:
    """The oracle: every adapter output, key and value materialised, as the library does."""
    d = packed.hidden_size
    lead = z.shape[:-1]
    z2 = z.reshape(-1, d)
    c = z2 if query_input is None else query_input.reshape(-1, d)
    rho = None if residual is None else residual.reshape(-1, d)
    entries = []  # e_ti for each adapter, [T, d]
    start = 0
    for i, r in enumerate(packed.ranks):
        pre = F.linear(z2, packed.w_down[start : start + r], packed.b_down[start : start + r])
        hidden = activation_fn(activation, pre)
        a_i = scaling[i] * F.linear(hidden, packed.w_up[:, start : start + r], packed.b_up[i])
        start += r
        entries.append(a_i + rho if residual_before else a_i)
    e = torch.stack(entries, dim=1)  # [T, N, d]
    q = _linear(c, query_weight, query_bias)  # [T, d]
    k = _linear(e, key_weight, key_bias)  # [T, N, d]
    v = _linear(e, value_weight, None)
    scores = torch.einsum("td,tnd->tn", q, k)
    scores = F.dropout(scores, dropout_p, training)
    probs = torch.softmax(scores / temperature, dim=-1)
    out = torch.einsum("tn,tnd->td", probs, v)
    if rho is not None and not residual_before:
        out = out + rho
    return out.reshape(*lead, d)


def _scale_blocks_(values: torch.Tensor, weights: torch.Tensor, packed: PackedSources) -> None:
    """``values [T, R] *= weights[:, s(·)]`` in place (each source's r columns by its weight)."""
    r = packed.equal_rank
    if r is not None and values.stride(-1) == 1:  # a view splits the columns
        values.view(values.shape[0], packed.num_sources, r).mul_(weights[:, :, None])
    else:
        values.mul_(weights.index_select(1, packed.source_index))


def _block_row_sum(values: torch.Tensor, packed: PackedSources) -> torch.Tensor:
    """``[T, R]`` -> ``[T, N]``: sum each source's r columns."""
    n, r = packed.num_sources, packed.equal_rank
    if r is not None:
        return values.reshape(values.shape[0], n, r).sum(-1)
    return values.new_zeros(values.shape[0], n).index_add(1, packed.source_index, values)


def fusion_scores(
    z: torch.Tensor,
    u: torch.Tensor,
    packed: PackedSources,
    omega: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """R3: ``σ_ti - γ_t = u_t · a_ti`` for all adapters at once, ``[T, N]`` (no [N, T, d]);
    also returns S ``[T, R]`` and U ``[d, R]`` for the inference path's up GEMM."""
    hidden = activation_fn(activation, torch.addmm(packed.b_down, z, packed.w_down.T))  # S [T, R]
    omega_cols = omega.index_select(0, packed.source_index)  # [R, d] or [R, 1]
    up = packed.w_up * omega_cols.T  # U [d, R]
    projected = u @ up  # Π = u·U [T, R]: the one extra GEMM of width N·r
    scores = _block_row_sum(hidden * projected, packed) + u @ (omega * packed.b_up).T
    return scores, hidden, up


def _weighted_sum_inference(hidden, up, probs, packed, omega, residual) -> torch.Tensor:
    """R4 without autograd, reusing the scores' S (no second down GEMM): (S ⊙ p[src])·Uᵀ + p·C."""
    hidden.mul_(probs.index_select(1, packed.source_index))
    bias = probs @ (omega * packed.b_up)
    if residual is not None:
        bias.add_(residual)
    return torch.addmm(bias, hidden, up.T)


def _adapter_fusion_fast(
    z2, c2, rho2, packed, query_weight, query_bias, key_weight, key_bias, value_weight,
    omega, temperature, dropout_p, training, residual_before, activation, backend,
) -> torch.Tensor:  # fmt: skip
    dropping = training and dropout_p > 0.0
    if z2.shape[0] > packed.total_rank and not (dropping and residual_before):
        return _adapter_fusion_weights_folded(
            z2, c2, rho2, packed, query_weight, query_bias, key_weight, key_bias, value_weight,
            omega, temperature, dropout_p, dropping, residual_before, activation, backend,
        )  # fmt: skip
    q = _linear(c2, query_weight, query_bias)  # [T, d]
    u = q if key_weight is None else q @ key_weight  # u_t = W_kᵀ q_t
    scores, hidden, up = fusion_scores(z2, u, packed, omega, activation)
    dropping = training and dropout_p > 0.0
    if dropping:  # R2 is exact only without dropout: keep the per-token shift γ_t
        shift = None
        if key_bias is not None:
            shift = q @ key_bias
        if residual_before:
            shift = (u * rho2).sum(-1) if shift is None else shift + (u * rho2).sum(-1)
        if shift is not None:
            scores = scores + shift[:, None]
        scores = F.dropout(scores, dropout_p, True)
    elif key_bias is not None and key_bias.requires_grad and torch.is_grad_enabled():
        scores = scores + key_bias.sum() * 0.0  # ∂L/∂b_k is exactly 0 here (R2); say so explicitly
    probs = torch.softmax(scores / temperature, dim=-1)
    # R4: the softmax weights scale S's blocks inside the core op (no [N, T, d] tensor). With no
    # gradient to take, the torch backend reuses S from the scores instead of recomputing it.
    mix_residual = rho2 if residual_before else None
    if backend == "torch" and not any(t.requires_grad for t in (probs, hidden, up, omega)):
        mixed = _weighted_sum_inference(hidden, up, probs, packed, omega, mix_residual)
    else:
        mixed = scaled_adapter_sum_packed(
            z2, packed, omega, mix_residual, activation=activation, backend=backend, row_scale=probs
        )
    if value_weight is None:  # R1: W_v once, after the weighted sum
        return mixed if residual_before or rho2 is None else mixed + rho2
    if residual_before or rho2 is None:
        return mixed @ value_weight.T
    return torch.addmm(rho2, mixed, value_weight.T)


def _fold_weights(packed, omega, query_weight, query_bias, key_weight, value_weight, acc):
    """R5's folds in dtype ``acc`` (differentiable): ``(score_weight [d, R + N], score_bias
    [R + N] or None, up_value [d, R], bias_value [N, d])`` with ``X = [U | Cᵀ]``:
    ``W_qᵀ·W_k·X``, ``b_q·W_k·X``, ``W_v·U``, ``C·W_vᵀ`` (a missing weight is the identity)."""
    omega_cols = omega.to(acc).index_select(0, packed.source_index)
    up = packed.w_up.to(acc) * omega_cols.T  # U [d, R]
    c = omega.to(acc) * packed.b_up.to(acc)  # C [N, d]
    x = torch.cat([up, c.T], 1)  # [d, R + N]
    if key_weight is not None:
        x = key_weight.to(acc) @ x
    score_weight = x if query_weight is None else query_weight.to(acc).T @ x
    score_bias = None if query_bias is None else query_bias.to(acc) @ x
    if value_weight is not None:
        up, c = value_weight.to(acc) @ up, c @ value_weight.to(acc).T
    return score_weight, score_bias, up, c


def _adapter_fusion_weights_folded(
    z2, c2, rho2, packed, query_weight, query_bias, key_weight, key_bias, value_weight,
    omega, temperature, dropout_p, dropping, residual_before, activation, backend,
) -> torch.Tensor:  # fmt: skip
    """R5 with gradients (``T > R``): the folds of ``fold_fusion`` built differentiably on every
    call, so no [T, d] x [d, d] GEMM runs. Per call the folds cost ~6·d²·R MACs against the
    ~6·T·d² of the Q, K and V GEMMs they replace. With score dropout the per-token shift
    γ_t = q_t·b_k is kept (R2) as ``c·(W_qᵀ b_k) + b_q·b_k``; dropout with ``residual_before``
    (γ also needs u·ρ) stays on the unfolded path."""
    r, dtype = packed.total_rank, z2.dtype
    acc = torch.promote_types(dtype, torch.float32)  # folds in >= fp32, then one cast
    score_weight, score_bias, up, c = _fold_weights(
        packed, omega, query_weight, query_bias, key_weight, value_weight, acc
    )
    scored = c2 @ score_weight.to(dtype)  # [T, R + N]: Π and the bias scores of every adapter
    if score_bias is not None:
        scored = scored + score_bias.to(dtype)
    hidden = activation_fn(activation, torch.addmm(packed.b_down, z2, packed.w_down.T))  # S
    scores = _block_row_sum(hidden * scored[:, :r], packed) + scored[:, r:]
    if dropping:
        if key_bias is not None:  # γ_t = q_t·b_k, folded: c·(W_qᵀ b_k) + b_q·b_k
            kb = key_bias.to(acc)
            shift = c2 @ (kb if query_weight is None else query_weight.to(acc).T @ kb).to(dtype)
            if query_bias is not None:
                shift = shift + (query_bias.to(acc) @ kb).to(dtype)
            scores = scores + shift[:, None]
        scores = F.dropout(scores, dropout_p, True)
    elif key_bias is not None and key_bias.requires_grad and torch.is_grad_enabled():
        scores = scores + key_bias.sum() * 0.0  # ∂L/∂b_k is exactly 0 here (R2); say so explicitly
    probs = torch.softmax(scores / temperature, dim=-1)
    if rho2 is None:
        residual = None
    elif residual_before:  # Σ p_i (a_i + ρ) = Σ p_i a_i + ρ, then W_v
        residual = rho2 if value_weight is None else rho2 @ value_weight.T
    else:
        residual = rho2
    mixed = PackedSources(
        packed.w_down, packed.b_down, up.to(dtype), c.to(dtype), packed.source_index, packed.ranks
    )
    ones = torch.ones(packed.num_sources, 1, dtype=dtype, device=z2.device)
    return scaled_adapter_sum_packed(
        z2, mixed, ones, residual, activation=activation, backend=backend, row_scale=probs
    )


# ---------------------------------------------------------------- inference: weights folded once


@dataclass(frozen=True)
class FusionFold:
    """AdapterFusion's fixed weights folded for inference (``fold_fusion``). With
    ``X = [U | Cᵀ]`` (the scaled up projections and biases, ``[d, R + N]``):

        score_weight = W_qᵀ·W_k·X  [d, R + N],  score_bias = b_q·W_k·X  [R + N]
        up_value = W_v·U  [d, R],               bias_value = C·W_vᵀ  [N, d]

    (a missing query/key/value is the identity, a missing query bias zero). Then per token
    ``u·a_i = (c·score_weight + score_bias)`` split into Π [R] and the bias scores [N], and
    ``W_v·Σ_i p_i a_i = (S ⊙ p[src])·up_valueᵀ + p·bias_value``: the query, key and value
    GEMMs (3 x 2·T·d² FLOPs) are gone. With ``merged`` (the query input is z) the down
    projection shares one GEMM with the scores: ``weight = [Dᵀ | score_weight]``."""

    weight: torch.Tensor  # [d, R (+ R + N when merged)]
    bias: torch.Tensor  # [R (+ R + N)]
    score_weight: torch.Tensor | None  # [d, R + N] when not merged (the query input is not z)
    score_bias: torch.Tensor | None
    up_value: torch.Tensor  # [d, R]
    bias_value: torch.Tensor  # [N, d]
    value_weight: torch.Tensor | None  # W_v, for ρ·W_vᵀ under residual_before
    packed: PackedSources
    merged: bool


def fold_fusion(
    packed: PackedSources,
    query_weight: torch.Tensor | None,
    query_bias: torch.Tensor | None,
    key_weight: torch.Tensor | None,
    value_weight: torch.Tensor | None,
    omega: torch.Tensor,
    *,
    merged: bool,
    dtype: torch.dtype,
) -> FusionFold:
    """Fold AdapterFusion's weights for inference (see ``FusionFold``), in float64 on CPU or
    float32 elsewhere, then cast to ``dtype``. The key bias drops out: it adds the same score
    to every adapter, and softmax ignores that without score dropout (R2)."""
    acc = torch.float64 if packed.w_down.device.type == "cpu" else torch.float32
    with torch.no_grad():
        score_weight, score_bias, up_value, bias_value = _fold_weights(
            packed, omega, query_weight, query_bias, key_weight, value_weight, acc
        )
        if score_bias is None:
            score_bias = score_weight.new_zeros(score_weight.shape[1])
        w_down, b_down = packed.w_down.to(acc).T, packed.b_down.to(acc)
        if merged:
            weight, bias = torch.cat([w_down, score_weight], 1), torch.cat([b_down, score_bias])
            score_weight = score_bias = None
        else:
            weight, bias = w_down, b_down

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dtype).contiguous()

    return FusionFold(
        cast(weight), cast(bias), cast(score_weight), cast(score_bias), cast(up_value), cast(bias_value),
        None if value_weight is None else value_weight.detach().to(dtype), packed.to(dtype), merged,
    )  # fmt: skip


def adapter_fusion_folded(
    z: torch.Tensor,
    fold: FusionFold,
    residual: torch.Tensor | None = None,
    *,
    query_input: torch.Tensor | None = None,
    temperature: float = 1.0,
    residual_before: bool = False,
    activation: str = "relu",
) -> torch.Tensor:
    """Inference AdapterFusion (no score dropout, nothing to differentiate) on folded weights:
    one GEMM for S and the scores (two with a separate query input), a [T, N] softmax, one
    GEMM for the value-projected weighted sum. Callers check z and the residual."""
    packed = fold.packed
    d, r = packed.hidden_size, packed.total_rank
    z2 = z.reshape(-1, d)
    rho = None if residual is None else residual.reshape(-1, d)
    y = torch.addmm(fold.bias, z2, fold.weight)  # [T, R] or [T, 2R + N]
    if fold.merged:
        pre, projected, bias_scores = y.split((r, r, packed.num_sources), dim=1)
    else:
        c2 = z2 if query_input is None else query_input.reshape(-1, d)
        pre = y
        projected, bias_scores = torch.addmm(fold.score_bias, c2, fold.score_weight).split(
            (r, packed.num_sources), dim=1
        )
    hidden = activation_fn(activation, pre, inplace=True)  # S
    scores = _block_row_sum(hidden * projected, packed) + bias_scores
    probs = torch.softmax(scores if temperature == 1.0 else scores / temperature, dim=-1)
    _scale_blocks_(hidden, probs, packed)  # S ⊙ p[src]
    if rho is None:
        out = hidden @ fold.up_value.T
    elif residual_before:  # ρ joined every value: Σ p_i (a_i + ρ) = Σ p_i a_i + ρ, then W_v
        base = rho if fold.value_weight is None else rho @ fold.value_weight.T
        out = torch.addmm(base, hidden, fold.up_value.T)
    else:
        out = torch.addmm(rho, hidden, fold.up_value.T)
    out.addmm_(probs, fold.bias_value)
    return out.reshape(z.shape)


def adapter_fusion_packed(
    z: torch.Tensor,
    packed: PackedSources,
    query_weight: torch.Tensor | None,
    query_bias: torch.Tensor | None,
    key_weight: torch.Tensor | None,
    key_bias: torch.Tensor | None,
    value_weight: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    *,
    query_input: torch.Tensor | None = None,
    scaling: float | torch.Tensor = 1.0,
    temperature: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = False,
    residual_before: bool = False,
    activation: str = "relu",
    backend: str = "auto",
) -> torch.Tensor:
    """``adapter_fusion`` on sources already packed by ``pack_sources``."""
    if not isinstance(z, torch.Tensor):
        raise ValueError(f"z must be a tensor; got {type(z).__name__}")
    check_activation(activation)
    omega = scaling_as_omega(scaling, packed, z)
    check_inputs(z, packed, omega, residual)
    _check_fusion_inputs(
        z, query_input, residual, query_weight, query_bias, key_weight, key_bias, value_weight,
        temperature, dropout_p, residual_before,
    )  # fmt: skip
    backend = resolve_backend(backend, z.device)
    kwargs = dict(temperature=float(temperature), dropout_p=dropout_p, training=training)
    if backend == "reference":
        return adapter_fusion_reference(
            z, packed, query_weight, query_bias, key_weight, key_bias, value_weight, residual,
            query_input=query_input, scaling=omega, residual_before=residual_before,
            activation=activation, **kwargs,
        )  # fmt: skip
    d = packed.hidden_size
    z2 = z.reshape(-1, d)
    c2 = z2 if query_input is None else query_input.reshape(-1, d)
    rho2 = None if residual is None else residual.reshape(-1, d)
    out = _adapter_fusion_fast(
        z2, c2, rho2, packed, query_weight, query_bias, key_weight, key_bias, value_weight,
        omega, kwargs["temperature"], dropout_p, training, residual_before, activation, backend,
    )  # fmt: skip
    return out.reshape(z.shape)


def adapter_fusion(
    z: torch.Tensor,
    w_down: TensorOrList,
    b_down: TensorOrList,
    w_up: TensorOrList,
    b_up: TensorOrList,
    query_weight: torch.Tensor | None,
    query_bias: torch.Tensor | None,
    key_weight: torch.Tensor | None,
    key_bias: torch.Tensor | None,
    value_weight: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    *,
    query_input: torch.Tensor | None = None,
    scaling: float | torch.Tensor = 1.0,
    temperature: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = False,
    residual_before: bool = False,
    activation: str = "relu",
    backend: str = "auto",
) -> torch.Tensor:
    """AdapterFusion of N bottleneck adapters, exactly as ``adapters``' ``BertFusion`` (module doc).

    Args:
        z: adapter input ``[..., d]`` (``LN(h + x)`` in a transformer layer).
        w_down, b_down, w_up, b_up: the N sources in nn.Linear layout, stacked
            (``[N, r, d]``, ``[N, r]``, ``[N, d, r]``, ``[N, d]``) or per-source lists.
        query_weight, query_bias, key_weight, key_bias: ``nn.Linear(d, d)`` weights ``[d, d]``
            and biases ``[d]``; ``None`` weights mean the config's query/key=False (identity).
        value_weight: ``[d, d]`` (no bias), or ``None`` for value=False ("static" fusion).
        residual: ``ρ`` (h for Pfeiffer adapters), added to the output, or with
            ``residual_before`` to every key and value.
        query_input: the query's input when it is not z (``query_before_ln``: h).
        scaling: the adapters' output scaling (float, ``[N]``, ``[N, 1]`` or ``[N, d]``).
        temperature: τ dividing the (dropped-out) scores.
        dropout_p, training: dropout on the scores, applied only when ``training``.
        activation: the adapters' non-linearity.
        backend: ``reference``, ``torch``, ``triton`` or ``auto``.
    """
    packed = pack_sources(w_down, b_down, w_up, b_up)
    return adapter_fusion_packed(
        z, packed, query_weight, query_bias, key_weight, key_bias, value_weight, residual,
        query_input=query_input, scaling=scaling, temperature=temperature, dropout_p=dropout_p,
        training=training, residual_before=residual_before, activation=activation, backend=backend,
    )  # fmt: skip
