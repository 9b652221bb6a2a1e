"""Input validation and packing of N source adapters into the two-GEMM layout.

Every backend works on one packed form (docs/design.md, "The algebra"):

    w_down  D      [R, d]   the N down projections stacked (R = Σ r_i)
    b_down  b_D    [R]
    w_up    W      [d, R]   the N up projections side by side
    b_up    B      [N, d]
    omega   ω      [N, d] (vector) or [N, 1] (uniform)
    source_index   [R] int64, the source each of the R bottleneck units belongs to

Heterogeneous bottleneck sizes (lists of per-source tensors) are concatenated here,
with autograd, so gradients still reach every list member. Every check raises a
``ValueError`` that names the argument and its shape.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, TypeVar

import torch

from .activations import ACTIVATIONS, check_activation  # noqa: F401  (re-exported)

TensorOrList = torch.Tensor | Sequence[torch.Tensor]
P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class PackedSources:
    """N source adapters in the concatenated layout of docs/design.md ("The algebra")."""

    w_down: torch.Tensor  # [R, d]
    b_down: torch.Tensor  # [R]
    w_up: torch.Tensor  # [d, R]
    b_up: torch.Tensor  # [N, d]
    source_index: torch.Tensor  # [R] int64
    ranks: tuple[int, ...]  # r_i per source

    @property
    def num_sources(self) -> int:
        return len(self.ranks)

    @property
    def equal_rank(self) -> int | None:
        """The common r when every source has the same rank (a [T, R] tensor then views as
        [T, N, r]), else ``None``."""
        return self.ranks[0] if len(set(self.ranks)) == 1 else None

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> PackedSources:
        """The same sources in another dtype (mixed precision) and optionally on another
        device; differentiable."""
        device = self.w_down.device if device is None else torch.device(device)
        if self.w_down.dtype == dtype and self.w_down.device == device:
            return self
        return PackedSources(
            self.w_down.to(device, dtype),
            self.b_down.to(device, dtype),
            self.w_up.to(device, dtype),
            self.b_up.to(device, dtype),
            self.source_index.to(device),
            self.ranks,
        )

    @property
    def hidden_size(self) -> int:
        return self.w_down.shape[1]

    @property
    def total_rank(self) -> int:
        return self.w_down.shape[0]


def _shape(t: torch.Tensor) -> str:
    return f"[{', '.join(str(s) for s in t.shape)}]"


def _as_list(name: str, value: TensorOrList, rank_if_stacked: int) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        if value.dim() != rank_if_stacked:
            raise ValueError(
                f"{name} must have {rank_if_stacked} dimensions (stacked over sources) or be a "
                f"list of per-source tensors; got shape {_shape(value)}"
            )
        return list(value.unbind(0)) if value.shape[0] else []
    if isinstance(value, Sequence) and all(isinstance(v, torch.Tensor) for v in value):
        for i, v in enumerate(value):
            if v.dim() != rank_if_stacked - 1:
                raise ValueError(
                    f"{name}[{i}] must have {rank_if_stacked - 1} dimensions; got shape {_shape(v)}"
                )
        return list(value)
    raise ValueError(f"{name} must be a tensor or a list of tensors; got {type(value).__name__}")


def pack_sources(
    w_down: TensorOrList,
    b_down: TensorOrList,
    w_up: TensorOrList,
    b_up: TensorOrList,
    *,
    hidden_size: int | None = None,
) -> PackedSources:
    """Validate N source adapters (stacked or per-source lists) and pack them.

    Stacked: ``w_down [N, r, d]``, ``b_down [N, r]``, ``w_up [N, d, r]``, ``b_up [N, d]``.
    Lists: ``w_down[i] [r_i, d]``, ``b_down[i] [r_i]``, ``w_up[i] [d, r_i]``, ``b_up[i] [d]``.
    """
    if isinstance(w_down, torch.Tensor) and isinstance(w_up, torch.Tensor) and w_down.dim() == 3:
        return _pack_stacked(w_down, b_down, w_up, b_up, hidden_size)
    wd = _as_list("w_down", w_down, 3)
    bd = _as_list("b_down", b_down, 2)
    wu = _as_list("w_up", w_up, 3)
    bu = _as_list("b_up", b_up, 2)
    n = len(wd)
    if n == 0:
        raise ValueError("w_down holds no sources (N = 0); at least one source adapter is needed")
    for name, lst in (("b_down", bd), ("w_up", wu), ("b_up", bu)):
        if len(lst) != n:
            raise ValueError(f"{name} holds {len(lst)} sources but w_down holds {n} (mismatched N)")
    d = wd[0].shape[1] if hidden_size is None else hidden_size
    if d == 0:
        raise ValueError(f"w_down[0] has shape {_shape(wd[0])}: the hidden size d must be at least 1")
    ranks = []
    for i in range(n):
        r = wd[i].shape[0]
        expect = {"w_down": (r, d), "b_down": (r,), "w_up": (d, r), "b_up": (d,)}
        for name, t in (("w_down", wd[i]), ("b_down", bd[i]), ("w_up", wu[i]), ("b_up", bu[i])):
            if tuple(t.shape) != expect[name]:
                raise ValueError(
                    f"{name}[{i}] has shape {_shape(t)}, expected {list(expect[name])} "
                    f"(source {i}: r={r}, d={d})"
                )
        ranks.append(r)
    device = wd[0].device
    source_index = torch.repeat_interleave(torch.arange(n, device=device), torch.tensor(ranks, device=device))
    return PackedSources(
        w_down=torch.cat(wd, 0),
        b_down=torch.cat(bd, 0),
        w_up=torch.cat(wu, 1),
        b_up=torch.stack(bu, 0),
        source_index=source_index,
        ranks=tuple(ranks),
    )


def taking_weights(
    packed_fn: Callable[Concatenate[torch.Tensor, PackedSources, P], R], name: str
) -> Callable[Concatenate[torch.Tensor, TensorOrList, TensorOrList, TensorOrList, TensorOrList, P], R]:
    """``packed_fn(z, packed, ...)`` as ``name(z, w_down, b_down, w_up, b_up, ...)``, which packs the
    sources with ``pack_sources`` on each call. Every other argument, its default and its
    documentation are ``packed_fn``'s, declared there once; ``help()`` and ``inspect`` show the
    full signature. A misspelt option is refused by ``packed_fn`` (``TypeError``), never dropped."""
    signature = inspect.signature(packed_fn)
    z, _, *rest = signature.parameters.values()
    weights = [
        inspect.Parameter(n, z.kind, annotation="TensorOrList") for n in ("w_down", "b_down", "w_up", "b_up")
    ]

    def call(z, w_down, b_down, w_up, b_up, *args, **kwargs):
        return packed_fn(z, pack_sources(w_down, b_down, w_up, b_up), *args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__module__ = packed_fn.__module__
    call.__signature__ = signature.replace(parameters=[z, *weights, *rest])
    call.__doc__ = (
        f"{inspect.cleandoc(packed_fn.__doc__ or '')}\n\n``{name}`` takes the N sources as weights in "
        "place of ``packed``: ``w_down, b_down, w_up, b_up`` in nn.Linear layout, stacked "
        "(``[N, r, d]``, ``[N, r]``, ``[N, d, r]``, ``[N, d]``) or as per-source lists (heterogeneous "
        "r allowed)."
    )
    return call


def _pack_stacked(w_down, b_down, w_up, b_up, hidden_size) -> PackedSources:
    n, r, d = w_down.shape
    if hidden_size is not None and d != hidden_size:
        raise ValueError(f"w_down has shape {_shape(w_down)}: its last dim must be d={hidden_size}")
    if n == 0:
        raise ValueError("w_down holds no sources (N = 0); at least one source adapter is needed")
    if d == 0:
        raise ValueError(f"w_down has shape {_shape(w_down)}: the hidden size d must be at least 1")
    expect = {"b_down": (n, r), "w_up": (n, d, r), "b_up": (n, d)}
    for name, t in (("b_down", b_down), ("w_up", w_up), ("b_up", b_up)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor when w_down is stacked; got {type(t).__name__}")
        if tuple(t.shape) != expect[name]:
            raise ValueError(
                f"{name} has shape {_shape(t)}, expected {list(expect[name])} "
                f"for w_down of shape {_shape(w_down)} (N={n}, r={r}, d={d})"
            )
    source_index = torch.arange(n, device=w_down.device).repeat_interleave(r)
    return PackedSources(
        w_down=w_down.reshape(n * r, d),
        b_down=b_down.reshape(n * r),
        w_up=w_up.permute(1, 0, 2).reshape(d, n * r),
        b_up=b_up,
        source_index=source_index,
        ranks=(r,) * n,
    )


def z_width_error(z: torch.Tensor, d: int, detail: str = "") -> ValueError:
    """The error for a z whose last dim is not the sources' hidden size ``d`` (raised by the
    prepared runners after their own inline check, and by the checks here)."""
    return ValueError(
        f"z has shape {_shape(z)}: its last dim must equal the sources' hidden size d={d}{detail}"
    )


def check_inputs(
    z: torch.Tensor,
    packed: PackedSources,
    omega: torch.Tensor | None,
    residual: torch.Tensor | None,
    *,
    row_scale: torch.Tensor | None = None,
) -> None:
    """Shapes, dtypes and devices of one call, with errors that name the argument
    (``omega=None``: ω is already folded into the up projection)."""
    if not isinstance(z, torch.Tensor):
        raise ValueError(f"z must be a tensor; got {type(z).__name__}")
    if z.dim() < 1:
        raise ValueError("z must have shape [..., d]; got a 0-d tensor")
    if not z.is_floating_point():
        raise ValueError(f"z must be a floating-point tensor; got dtype {z.dtype}")
    d = packed.hidden_size
    n = packed.num_sources
    if z.shape[-1] != d:
        raise z_width_error(z, d, f" (w_down is [R={packed.total_rank}, d={d}])")
    if omega is not None:
        if not isinstance(omega, torch.Tensor):
            raise ValueError(f"omega must be a tensor; got {type(omega).__name__}")
        if omega.dim() != 2 or omega.shape[0] != n or omega.shape[1] not in (1, d):
            raise ValueError(
                f"omega has shape {_shape(omega)}, expected [N={n}, d={d}] (vector) or [N={n}, 1] (uniform)"
            )
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise ValueError(f"residual must be a tensor or None; got {type(residual).__name__}")
        if residual.shape != z.shape:
            raise ValueError(f"residual has shape {_shape(residual)}, expected z's shape {_shape(z)}")
    if row_scale is not None:
        if not isinstance(row_scale, torch.Tensor):
            raise ValueError(f"row_scale must be a tensor [..., N] or None; got {type(row_scale).__name__}")
        expect = (*z.shape[:-1], n)
        if tuple(row_scale.shape) != expect:
            raise ValueError(f"row_scale has shape {_shape(row_scale)}, expected {list(expect)}")
    named = [
        ("w_down", packed.w_down),
        ("b_down", packed.b_down),
        ("w_up", packed.w_up),
        ("b_up", packed.b_up),
    ]
    if omega is not None:
        named.append(("omega", omega))
    if residual is not None:
        named.append(("residual", residual))
    if row_scale is not None:
        named.append(("row_scale", row_scale))
    check_same_dtype_device(z, named)


def check_folded_inputs(
    z: torch.Tensor,
    packed: PackedSources,
    folded_up: torch.Tensor,
    folded_bias: torch.Tensor,
    residual: torch.Tensor | None,
) -> None:
    """``check_inputs`` for the inference fast path, where ω is already folded into
    ``folded_up [d, R]`` and ``folded_bias [d]``."""
    d, total_rank = packed.hidden_size, packed.total_rank
    if folded_up.shape != (d, total_rank):
        raise ValueError(f"folded_up has shape {_shape(folded_up)}, expected [d={d}, R={total_rank}]")
    if folded_bias.numel() != d:
        raise ValueError(f"folded_bias has shape {_shape(folded_bias)}, expected [d={d}]")
    check_inputs(z, packed, None, residual)
    check_same_dtype_device(z, [("folded_up", folded_up), ("folded_bias", folded_bias)])


def check_same_dtype_device(z: torch.Tensor, named: list[tuple[str, torch.Tensor]]) -> None:
    """Every named tensor shares z's dtype and device."""
    for name, t in named:
        if t.dtype != z.dtype:
            raise ValueError(
                f"{name} has dtype {t.dtype} but z has dtype {z.dtype}; all inputs must share one "
                f"dtype (cast with .to({z.dtype}))"
            )
        if t.device != z.device:
            raise ValueError(f"{name} is on {t.device} but z is on {z.device}; move them to one device")
