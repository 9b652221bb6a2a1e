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

Coefficients. Exactly one way of scaling the up projections is given (or a task bank, below):

- ``omega`` [N, d] or [N, 1]: ω is applied to W and B inside this call (training, or any call
  whose ω may change);
- ``scaled_up`` [d, R] and ``scaled_bias`` [d]: U = W ⊙ ω[s]ᵀ and Σ_i ω_i ⊙ B_i, computed
  beforehand (``algebra.scale_up_projections``); inference only, not differentiable.

``row_scale`` [T, N] additionally weights source i in row t (routers, gates, AdapterFusion's
softmax); it combines with ``omega`` or a task bank, not with ``scaled_up``.

A task bank replaces ``omega``: ``omega_bank`` [K, N, d] (vector) or [K, N, 1] (uniform) holds
the ω of K target tasks and ``task_index`` [T] int64 names the task of each row, so row t is
scaled by Ω[task_index[t]] (``ops/bank.py``). Its gradient is non-zero only in the rows of the
bank whose tasks occur in the call.

Fields. The schema of the custom op is generated from the annotations below, in field order
(``Tensor`` / ``Tensor | None`` / ``str`` / ``bool``): a new input is one new line here, with
a default so that existing constructions keep their meaning.
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
    # a task bank (instead of omega): row t is scaled by omega_bank[task_index[t]]
    omega_bank: Tensor | None = None  # Ω [K, N, d] or [K, N, 1]
    task_index: Tensor | None = None  # k [T] int64: the task of each row
    # with save_for_backward: keep nothing of size T·R, the backward recomputes P from z
    # (ops/saved_state.py decides; backends see a call that saves nothing)
    recompute_pre: bool = False

    @property
    def num_sources(self) -> int:
        """N (B has one row per source); R is ``w_down.shape[0]``."""
        return self.b_up.shape[0]


_SCHEMA_TYPES = {"Tensor": "Tensor", "Tensor | None": "Tensor?", "str": "str", "bool": "bool"}


def _annotation(name: str) -> str:
    hint = Composition.__annotations__[name]  # a string or a ForwardRef (postponed annotations)
    return hint if isinstance(hint, str) else hint.__forward_arg__


FIELD_TYPES: dict[str, str] = {name: _SCHEMA_TYPES[_annotation(name)] for name in Composition._fields}
"""Each field's type in the custom op's schema, from its annotation."""

TENSOR_FIELDS: tuple[str, ...] = tuple(n for n, t in FIELD_TYPES.items() if t.startswith("Tensor"))
"""The tensor fields, in field order."""


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
    omega_bank: Tensor | bool | None = None


GRAD_FIELDS: tuple[str, ...] = Gradients._fields


class Backend(Protocol):
    """What ``reference``, ``torch``, ``triton`` and ``auto`` implement (as module functions)."""

    def forward(self, call: Composition) -> tuple[Tensor, Tensor]:
        """``(out [T, d], pre [T, R])``; ``pre`` is an empty tensor unless ``call.save_for_backward``."""
        ...

    def backward(self, call: Composition, pre: Tensor, grad_out: Tensor, needs: Gradients) -> Gradients:
        """The gradients flagged in ``needs`` (others ``None``), from the saved pre-activation."""
        ...


def op_schema() -> str:
    """The argument list of the custom op: ``Composition``'s fields in order (one source of truth)."""
    return ", ".join(f"{kind} {name}" for name, kind in FIELD_TYPES.items())
