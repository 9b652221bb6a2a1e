"""The one activation table: names, the integer ids the Triton kernels switch on, and the
torch functions (and their derivatives) the reference and torch backends use.

A source adapter's non-linearity is one of ``ACTIVATIONS``; its position in that tuple is its
kernel id (``activation_id``). The `adapters` library's names map onto these in
``formats`` (``relu``, ``gelu``, ``swish``/``silu``, ``tanh``, ``linear``/``identity``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "identity")
_IDS = {name: i for i, name in enumerate(ACTIVATIONS)}


def check_activation(activation: str) -> str:
    """``activation`` if it is one of ``ACTIVATIONS``, else a ValueError naming it."""
    if activation not in _IDS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")
    return activation


def activation_id(activation: str) -> int:
    """The constexpr id the Triton kernels switch on (the index in ``ACTIVATIONS``)."""
    return _IDS[check_activation(activation)]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _silu_(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x, inplace=True)


_OVERWRITING = {
    "relu": torch.relu_, "gelu": F.gelu, "silu": _silu_, "tanh": torch.tanh_, "identity": _identity,
}  # fmt: skip


def overwriting_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``act`` as one callable that may overwrite its input (in place where ATen has the op),
    looked up once: the inference runners call it on a pre-activation nothing else reads."""
    return _OVERWRITING[check_activation(name)]


def activation_fn(name: str, x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """``act(x)``; with ``inplace=True`` it may overwrite ``x`` (the inference path)."""
    if name == "relu":
        return x.relu_() if inplace else F.relu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "silu":
        return F.silu(x, inplace=inplace)
    if name == "tanh":
        return x.tanh_() if inplace else torch.tanh(x)
    if name == "identity":
        return x
    raise ValueError(f"activation must be one of {ACTIVATIONS}; got {name!r}")


def activation_grad(name: str, pre: torch.Tensor) -> torch.Tensor:
    """d act(x) / dx evaluated at the saved pre-activation."""
    if name == "relu":
        return (pre > 0).to(pre.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(pre * 0.7071067811865476))
        pdf = torch.exp(-0.5 * pre * pre) * 0.3989422804014327
        return cdf + pre * pdf
    if name == "silu":
        sig = torch.sigmoid(pre)
        return sig * (1.0 + pre * (1.0 - sig))
    if name == "tanh":
        return 1.0 - torch.tanh(pre) ** 2
    if name == "identity":
        return torch.ones_like(pre)
    raise ValueError(f"activation must be one of {ACTIVATIONS}; got {name!r}")
