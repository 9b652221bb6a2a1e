"""One typed description of a composition call, and the protocol every backend implements.

Every method this engine serves is one sum over N bottleneck modules at one site
(docs/design.md, "One formula"):

    out[t] = Σ_i c_i(t) ⊙ ( U_i · act(D_i · z[t] + b_i) + B_i ) + residual[t]

A ``Composition`` holds everything one call of that sum needs, by name: the input rows, the
packed sources (``ops/packing.py``), the coefficients, the residual, the activation and whether
the call saves state for a backward. A backend (``reference``, ``torch``, ``triton``, ``auto``)
is a module with two functions over it:

    forward(call)                          -> (out [T, d], pre [T, R] or an empty tensor)
    backward(call, pre, grad_out, needs)   -> Gradients (an entry per differentiable field)

The ``torch.library`` custom op and the eager ``autograd.Function`` (``ops/dispatch.py``) are
thin adapters over these two functions: the op's schema, its fake and its gradient positions
are all derived from ``TENSOR_FIELDS`` below. Adding an input means adding a field here and
using it in the backends that support it; a backend that does not support a field raises.

Coefficients. Exactly one way of scaling the up projections is given:

- ``omega`` [N, d] or [N, 1]: ω is applied to W and B inside this call (training, or any call
  whose ω may change);
- ``scaled_up`` [d, R] and ``scaled_bias`` [d]: U = W ⊙ ω[s]ᵀ and Σ_i ω_i ⊙ B_i, computed
  beforehand (``algebra.scale_up_projections``); inference only, not differentiable.

``row_scale`` [T, N] additionally weights source i in row t (routers, gates, AdapterFusion's
softmax); it combines with ``omega`` only.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

Tensor = torch.Tensor


class Composition(NamedTuple):
    """One call of the composition, in rows: ``z`` is [T, d] (the functional flattens leading dims)."""

    # the input rows
    z: Tensor  # [T, d]
    # the N sources, packed: R = Σ r_i bottleneck units
    w_down: Tensor  # D [R, d]
    b_down: Tensor  # b_D [R]
    w_up: Tensor  # W [d, R], the raw up projections
    b_up: Tensor  # B [N, d], the raw up biases
    source_index: Tensor  # s [R] int64: the source of each unit
    # coefficients: either omega, or scaled_up + scaled_bias (ω applied beforehand)
    omega: Tensor | None  # ω [N, d] or [N, 1]
    scaled_up: Tensor | None  # U = W ⊙ ω[s]ᵀ [d, R]
    scaled_bias: Tensor | None  # Σ_i ω_i ⊙ B_i [d]
    row_scale: Tensor | None  # w [T, N], per-row source weights
    # added to the sum
    residual: Tensor | None  # [T, d]
    # how
    activation: str = "relu"
    save_for_backward: bool = False

    @property
    def num_sources(self) -> int:
        return self.b_up.shape[0]

    @property
    def total_rank(self) -> int:
        return self.w_down.shape[0]

    @property
    def omega_applied(self) -> bool:
        """Whether ω was applied to the up projections beforehand (``scaled_up``)."""
        return self.scaled_up is not None


TENSOR_FIELDS: tuple[str, ...] = Composition._fields[:11]
"""The tensor fields, in the order the custom op takes them."""

OPTIONAL_TENSOR_FIELDS = frozenset({"omega", "scaled_up", "scaled_bias", "row_scale", "residual"})


class Gradients(NamedTuple):
    """One entry per differentiable field of ``Composition`` (the residual's gradient is the output
    gradient itself, added by the dispatch layer). As ``needs``, the entries are booleans."""

    z: Tensor | bool | None = None
    w_down: Tensor | bool | None = None
    b_down: Tensor | bool | None = None
    w_up: Tensor | bool | None = None
    b_up: Tensor | bool | None = None
    omega: Tensor | bool | None = None
    row_scale: Tensor | bool | None = None


GRAD_FIELDS: tuple[str, ...] = Gradients._fields
NO_GRADIENTS = Gradients(*(False,) * len(GRAD_FIELDS))


class Backend(Protocol):
    """What ``reference``, ``torch``, ``triton`` and ``auto`` implement (as module functions)."""

    def forward(self, call: Composition) -> tuple[Tensor, Tensor]:
        """``(out [T, d], pre [T, R])``; ``pre`` is an empty tensor unless ``call.save_for_backward``."""
        ...

    def backward(self, call: Composition, pre: Tensor, grad_out: Tensor, needs: Gradients) -> Gradients:
        """The gradients flagged in ``needs`` (others ``None``), from the saved pre-activation."""
        ...


def op_schema(name_prefix: str = "") -> str:
    """The argument list of the custom op, generated from ``TENSOR_FIELDS`` (one source of truth)."""
    tensors = ", ".join(
        f"Tensor{'?' if name in OPTIONAL_TENSOR_FIELDS else ''} {name_prefix}{name}" for name in TENSOR_FIELDS
    )
    return f"{tensors}, str activation, bool save_for_backward"
