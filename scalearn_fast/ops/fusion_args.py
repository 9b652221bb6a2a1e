"""What one AdapterFusion call mixes with (``FusionWeights``) and the checks of its arguments.

The fusion's own weights (query, key, value), the sources' output scaling as the core op's ω,
the softmax temperature, the score dropout and the ``residual_before`` flag travel together as
one frozen ``FusionWeights``: every backend reads the fields it needs by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .packing import PackedSources


@dataclass(frozen=True)
class FusionWeights:
    """AdapterFusion's weights and settings for one call (docs/fusion.md has the math).

    ``query_*`` / ``key_*``: ``nn.Linear(d, d)`` weights ``[d, d]`` and biases ``[d]``, ``None``
    for a projection the config leaves out (the identity). ``value_weight``: ``[d, d]`` without
    bias, ``None`` for "static" fusion. ``scaling``: the sources' output scaling as the core
    op's ω, ``[N, 1]`` or ``[N, d]`` (``scaling_as_omega``). ``temperature``: τ dividing the
    scores. ``dropout_p``: dropout on the scores in training. ``residual_before``: the residual
    joins every key and value instead of the output."""

    query_weight: torch.Tensor | None
    query_bias: torch.Tensor | None
    key_weight: torch.Tensor | None
    key_bias: torch.Tensor | None
    value_weight: torch.Tensor | None
    scaling: torch.Tensor
    temperature: float = 1.0
    dropout_p: float = 0.0
    residual_before: bool = False

    def query(self, c: torch.Tensor) -> torch.Tensor:
        """``q = W_q·c + b_q`` (``c`` itself when there is no query projection)."""
        return c if self.query_weight is None else F.linear(c, self.query_weight, self.query_bias)

    def key(self, e: torch.Tensor) -> torch.Tensor:
        """``k = W_k·e + b_k`` (``e`` itself when there is no key projection)."""
        return e if self.key_weight is None else F.linear(e, self.key_weight, self.key_bias)

    def value(self, e: torch.Tensor) -> torch.Tensor:
        """``v = W_v·e`` (``e`` itself when there is no value projection)."""
        return e if self.value_weight is None else F.linear(e, self.value_weight)


def _shape(t: torch.Tensor) -> str:
    return f"[{', '.join(str(s) for s in t.shape)}]"


def check_like_z(name: str, t: torch.Tensor | None, shape: tuple[int, ...], z: torch.Tensor) -> None:
    """``t`` (optional) is a tensor of ``shape`` with z's dtype and device, else a ValueError."""
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


def check_fusion_inputs(
    z: torch.Tensor,
    weights: FusionWeights,
    residual: torch.Tensor | None,
    query_input: torch.Tensor | None,
) -> None:
    """Shapes, dtypes and devices of the fusion weights and inputs, the settings' ranges."""
    d = z.shape[-1]
    for name in ("query_weight", "query_bias", "key_weight", "key_bias", "value_weight"):
        check_like_z(name, getattr(weights, name), (d,) if name.endswith("bias") else (d, d), z)
    if weights.query_bias is not None and weights.query_weight is None:
        raise ValueError("query_bias was given without query_weight (query=False has no bias)")
    if weights.key_bias is not None and weights.key_weight is None:
        raise ValueError("key_bias was given without key_weight (key=False has no bias)")
    check_like_z("query_input", query_input, tuple(z.shape), z)
    if weights.residual_before and residual is None:
        raise ValueError("residual_before=True adds the residual to keys and values; pass residual")
    temperature = weights.temperature
    if not isinstance(temperature, float | int) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number; got {temperature!r}")
    if not 0.0 <= weights.dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {weights.dropout_p!r}")


@dataclass(frozen=True)
class FusionCall:
    """One AdapterFusion call on 2-D inputs, as every backend's path receives it: ``z2``, the
    query input ``c2`` and the residual ``rho2`` (``[T, d]``), the packed sources, the
    ``FusionWeights``, whether score dropout applies to this call (``dropping``), the
    activation and the backend."""

    z2: torch.Tensor
    c2: torch.Tensor
    rho2: torch.Tensor | None
    packed: PackedSources
    weights: FusionWeights
    dropping: bool
    activation: str
    backend: str
