"""What ``ScaLearnLayer`` and ``AdapterFusionLayer`` share: N frozen source adapters held in the
packed layout (``ops.packing``), their names, and the checks of a sub-layer ``forward(h, x)``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypedDict, TypeVar

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .ops.packing import PackedSources, TensorOrList, check_activation, pack_sources

T = TypeVar("T")


class SiteOptions(TypedDict, total=False):
    """The keyword arguments every sub-layer passes on to ``FrozenSources`` (documented there)."""

    activation: str
    backend: str
    layer_norm: nn.Module | None
    source_names: Sequence[str] | None


_optimizer_steps = 0  # torch.optim steps taken in this process (fused optimizers included)


def _count_optimizer_step(*_: object) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


# registered once, on import: a layer unpickled in another process must count steps as well
_step_hook = register_optimizer_step_post_hook(_count_optimizer_step)


def weights_key(tensors: Iterable[torch.Tensor | None]) -> tuple | None:
    """What an eval-mode cache of values derived from ``tensors`` (``None`` entries, an absent
    bias, are skipped) is valid for: each tensor's storage and version counter, and the number
    of optimizer steps taken so far (a fused optimizer such as ``AdamW(fused=True)``, the
    Trainer's default, updates parameters without bumping their version counters). ``None``
    (do not cache) for tensors made under
    ``torch.inference_mode``, which have no version counter. In-place edits through ``.data``
    are invisible to both; call the layer's ``invalidate_cache()`` after them."""
    try:
        return (_optimizer_steps, *[(t.data_ptr(), t._version) for t in tensors if t is not None])
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


def check_matches_z(name: str, t: torch.Tensor | None, z: torch.Tensor) -> None:
    """An eval-path input beside z (the residual, a query input) must have z's shape, dtype, device."""
    if t is not None and (t.shape != z.shape or t.dtype != z.dtype or t.device != z.device):
        raise ValueError(
            f"{name} ({list(t.shape)}, {t.dtype}, {t.device}) must match z "
            f"({list(z.shape)}, {z.dtype}, {z.device})"
        )


def apply_layer_norm(layer_norm: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``layer_norm(x)``; an ``nn.LayerNorm`` (or a reference to one: ``.module``) runs as the one
    ATen call its forward makes (``layer_norm_args``)."""
    args = layer_norm_args(layer_norm)
    return layer_norm(x) if args is None else torch.layer_norm(x, *args)


def layer_norm_args(layer_norm: object) -> tuple | None:
    """``(normalized_shape, weight, bias, eps)`` of an ``nn.LayerNorm`` (or of a reference to one:
    ``.module``), so that it runs as the one ATen call its forward makes, without the module and
    functional wrappers around it (host time: a sub-layer runs it twice a call); ``None`` for
    any other callable. Reads no attribute through ``nn.Module.__getattr__``."""
    module: Any = layer_norm
    if type(module) is not nn.LayerNorm:
        module = getattr(module, "__dict__", _NO_ATTRIBUTES).get("module", module)
        if type(module) is not nn.LayerNorm:
            return None
    params = module._parameters
    return module.normalized_shape, params["weight"], params["bias"], module.eps


_NO_ATTRIBUTES: dict[str, Any] = {}


def layer_norm_of(sublayer: nn.Module) -> Any:
    """``sublayer.layer_norm`` without ``nn.Module.__getattr__`` (a registered ``nn.LayerNorm``,
    a reference to the model's, or None): read on every call."""
    layer_norm = sublayer._modules.get("layer_norm")
    return layer_norm if layer_norm is not None else sublayer.__dict__.get("layer_norm")


def layer_norm_parts(sublayer: nn.Module) -> tuple[Any, tuple | None]:
    """``(layer_norm_of(sublayer), its layer_norm_args)``: what the eval path reads on every call."""
    layer_norm = layer_norm_of(sublayer)
    return layer_norm, layer_norm_args(layer_norm)


def check_pre_ln(owner: str, pre_ln: bool, layer_norm: object) -> None:
    """A pre-LN sub-layer has no LayerNorm around the composition: refuse one passed to it."""
    if not isinstance(pre_ln, bool):
        raise ValueError(f"{owner}: pre_ln must be a bool; got {pre_ln!r}")
    if pre_ln and layer_norm is not None:
        raise ValueError(
            f"{owner}: pre_ln=True applies no LayerNorm around the composition; pass layer_norm=None"
        )


def check_residual_pair(hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> None:
    """The FFN output h and its residual x of a sub-layer ``forward(h, x)`` must match in shape."""
    if hidden_states.shape != input_tensor.shape:
        raise ValueError(
            f"hidden_states has shape {list(hidden_states.shape)} but input_tensor has "
            f"{list(input_tensor.shape)}; they must match"
        )


def check_sublayer_inputs(
    owner: str, layer_norm: nn.Module | None, hidden_states: torch.Tensor, input_tensor: torch.Tensor
) -> nn.Module:
    """The checks of a sub-layer ``forward(h, x)``: a LayerNorm is set and h, x match."""
    if layer_norm is None:
        raise ValueError(
            f"{owner}.forward needs the layer's output LayerNorm (pass layer_norm=...); "
            "use compose(z, residual) for the composition alone"
        )
    check_residual_pair(hidden_states, input_tensor)
    return layer_norm


class FrozenSources(nn.Module):
    """N bottleneck source adapters, packed and frozen (``requires_grad=False`` Parameters, so they
    follow ``.to()`` and show in the state dict as ``w_down``, ``b_down``, ``w_up``, ``b_up``).

    Args:
        w_down, b_down, w_up, b_up: nn.Linear layout, stacked (``[N, r, d]``, ``[N, r]``,
            ``[N, d, r]``, ``[N, d]``) or per-source lists (ranks may differ).
        activation: the sources' non-linearity.
        backend: ``auto``, ``torch``, ``triton`` or ``reference``.
        layer_norm: the layer's pre-trained output LayerNorm, used by ``forward``.
        source_names: optional names of the N sources, in order (default ``"0"``, ``"1"``, ...).
        pre_ln: the sub-layer sits at a pre-LN site (no LayerNorm around the composition;
            ``layer_norm`` must be None). Only sub-layers that name it in their signature
            support it (``attach`` reads the signature).
    """

    w_down: nn.Parameter
    b_down: nn.Parameter
    w_up: nn.Parameter
    b_up: nn.Parameter
    source_index: torch.Tensor

    def __init__(
        self,
        *sources: TensorOrList,
        activation: str = "relu",
        backend: str = "auto",
        layer_norm: nn.Module | None = None,
        source_names: Sequence[str] | None = None,
        pre_ln: bool = False,
    ) -> None:
        super().__init__()
        if len(sources) != 4:
            raise ValueError(
                f"{type(self).__name__} takes the sources as four positional arguments w_down, b_down, "
                f"w_up, b_up (stacked tensors or per-source lists); got {len(sources)}"
            )
        packed = pack_sources(*sources)
        for name in ("w_down", "b_down", "w_up", "b_up"):
            value = getattr(packed, name).detach().clone()
            self.register_parameter(name, nn.Parameter(value, requires_grad=False))
        self.register_buffer("source_index", packed.source_index, persistent=False)
        self.ranks = packed.ranks
        n = packed.num_sources
        self.source_names = list(source_names) if source_names is not None else [str(i) for i in range(n)]
        if len(self.source_names) != n:
            raise ValueError(f"source_names holds {len(self.source_names)} names for N={n} sources")
        self._folded: tuple[tuple, Any] | None = None  # (key, value): the eval-mode cache
        check_pre_ln(type(self).__name__, pre_ln, layer_norm)
        self.pre_ln = pre_ln
        self.activation = check_activation(activation)
        self.backend = backend
        self.layer_norm = layer_norm

    def _cached(self, key: tuple, build: Callable[..., T], *args: Any) -> T:
        """The eval-mode cache: ``build(*args)``'s value, kept while ``key`` stays the same.
        ``key`` ends with ``weights_key(...)``; when that is ``None`` nothing is kept."""
        folded = self._folded
        if folded is None or folded[0] != key or key[-1] is None:
            folded = self._folded = (key, build(*args))
        return folded[1]

    def post_ln_sublayer(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        """``LN(compose(LN(h + x), residual=h + x))``: the post-LN sub-layer around a subclass's
        ``compose(z, residual=...)``, with its ``layer_norm``."""
        layer_norm = check_sublayer_inputs(type(self).__name__, self.layer_norm, hidden_states, input_tensor)
        pre_ln = hidden_states + input_tensor
        z = apply_layer_norm(layer_norm, pre_ln)
        return apply_layer_norm(layer_norm, self.compose(z, residual=pre_ln))  # type: ignore[attr-defined]

    def __getstate__(self) -> dict[str, Any]:
        """The state without the eval-mode cache (its runners are closures over the folded
        weights: rebuilt on the first eval call of a copy or an unpickled layer)."""
        state = dict(self.__dict__)
        state["_folded"] = None
        return state

    def invalidate_cache(self) -> None:
        """Drop the eval-mode cache of folded weights. Needed only after in-place edits through
        ``.data``, which PyTorch does not track; every other change is seen (``weights_key``)."""
        self._folded = None

    def train(self, mode: bool = True) -> FrozenSources:
        self._folded = None  # a train/eval switch always starts from fresh weights
        return super().train(mode)

    @property
    def num_sources(self) -> int:
        return len(self.ranks)

    @property
    def hidden_size(self) -> int:
        return self.w_down.shape[1]

    def packed(self) -> PackedSources:
        return PackedSources(self.w_down, self.b_down, self.w_up, self.b_up, self.source_index, self.ranks)
