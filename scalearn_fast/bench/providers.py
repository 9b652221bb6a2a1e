"""The implementations the suite compares, behind two registries (name -> factory).

A factory takes the sources (``Sources``) and returns a ``Provider``: an nn.Module whose
``forward(z, residual)`` is one layer's composition, plus the parameters that train in the
forward+backward benchmark. A factory that cannot run here raises ``ProviderUnavailable``
with the reason; the suite turns it into a pytest skip.

ScaLearn: ``naive`` (the per-adapter loop), ``compile`` (torch.compile of it), ``torch`` and
``triton`` (scalearn_fast backends), ``auto`` (the default on CUDA: per shape class the faster
of the two, measured). AdapterFusion ("dynamic"): ``naive`` (a faithful loop),
``adapters`` (the library's own ``BertFusion``), and ``AdapterFusionLayer`` with the ``torch``,
``triton`` and ``auto`` backends (``fused_fusion_factory``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import ScaLearnLayer
from ..ops.packing import pack_sources
from ..ops.reference import scaled_adapter_sum_reference


class ProviderUnavailable(RuntimeError):
    """This provider cannot run on this machine; the message says why."""


def adapters_installed() -> bool:
    """Whether the ``adapters`` library imports (``find_spec`` is unreliable once it is imported:
    the library replaces its own module object)."""
    try:
        import adapters  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Sources:
    """N bottleneck adapters (nn.Linear layout, stacked) and a ScaLearn ω."""

    w_down: torch.Tensor  # [N, r, d]
    b_down: torch.Tensor  # [N, r]
    w_up: torch.Tensor  # [N, d, r]
    b_up: torch.Tensor  # [N, d]
    omega: torch.Tensor  # [N, d]

    @property
    def d(self) -> int:
        return self.w_down.shape[2]


def make_sources(
    n: int, d: int, r: int, *, dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> Sources:
    """Random sources like trained Pfeiffer adapters: weights N(0, 0.02), small biases, ω N(2/N, 1e-3)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.02, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std + mean).to(device=device, dtype=dtype)

    return Sources(rnd(n, r, d), rnd(n, r), rnd(n, d, r), rnd(n, d), rnd(n, d, std=1e-3, mean=2.0 / n))


@dataclass
class Provider:
    module: nn.Module  # forward(z, residual) -> out
    trainable: list[nn.Parameter]  # what the forward+backward benchmark differentiates (with z)
    warmup: int = 1  # extra untimed calls before timing (compilation, autotuning)


ProviderFactory = Callable[[Sources], Provider]


# ---------------------------------------------------------------- ScaLearn


def _bottleneck(
    w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor
) -> nn.Module:
    """One Pfeiffer adapter as ``adapters`` builds it: Linear(d, r) -> ReLU -> Linear(r, d), frozen."""
    r, d = w_down.shape
    down = nn.Linear(d, r, device=w_down.device, dtype=w_down.dtype)
    up = nn.Linear(r, d, device=w_up.device, dtype=w_up.dtype)
    with torch.no_grad():
        down.weight.copy_(w_down)
        down.bias.copy_(b_down)
        up.weight.copy_(w_up)
        up.bias.copy_(b_up)
    module = nn.Sequential(down, nn.ReLU(), up)
    module.requires_grad_(False)
    return module


def _bottlenecks(src: Sources) -> nn.ModuleList:
    """The N sources as frozen ``adapters``-style bottleneck modules, in order."""
    weights = zip(src.w_down, src.b_down, src.w_up, src.b_up, strict=True)
    return nn.ModuleList(_bottleneck(*w) for w in weights)


class NaiveScaLearn(nn.Module):
    """ScaLearn as the per-adapter loop: each adapter's Linear -> ReLU -> Linear materialises
    a [T, d] output, which is scaled by ω_i and added to the running sum."""

    def __init__(self, src: Sources) -> None:
        super().__init__()
        self.adapters = _bottlenecks(src)
        self.omega = nn.Parameter(src.omega.detach().clone())

    def forward(self, z: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out = residual
        for i, adapter in enumerate(self.adapters):
            out = out + self.omega[i] * adapter(z)
        return out


class FusedScaLearn(nn.Module):
    """``ScaLearnLayer.compose`` with a chosen backend, ω dropout off (the naive loop has none)."""

    def __init__(self, src: Sources, backend: str) -> None:
        super().__init__()
        self.layer = ScaLearnLayer(
            src.w_down,
            src.b_down,
            src.w_up,
            src.b_up,
            omega=nn.Parameter(src.omega.detach().clone()),
            omega_dropout=0.0,
            backend=backend,
        )

    def forward(self, z: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.layer.compose(z, residual)


def _naive(src: Sources) -> Provider:
    m = NaiveScaLearn(src).eval()
    return Provider(m, [m.omega])


def _compile(src: Sources) -> Provider:
    m = NaiveScaLearn(src).eval()
    # a fresh Dynamo cache per case: many modules share NaiveScaLearn.forward, and the
    # recompile limit would otherwise send later cases back to eager without a word.
    torch._dynamo.reset()
    # dynamic=False: one graph per shape, like a deployment with a fixed batch; the warm-up
    # calls below compile it before anything is timed.
    return Provider(torch.compile(m, dynamic=False), [m.omega], warmup=3)


class ReferenceScaLearn(nn.Module):
    """scalearn_fast's oracle loop (``scaled_adapter_sum_reference``): per-source slices of the
    packed weights, plain autograd. Called directly: ``ScaLearnLayer`` in eval mode would take
    its ω-folded inference path instead, whatever the backend."""

    def __init__(self, src: Sources) -> None:
        super().__init__()
        self.packed = pack_sources(src.w_down, src.b_down, src.w_up, src.b_up)
        self.omega = nn.Parameter(src.omega.detach().clone())

    def forward(self, z: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return scaled_adapter_sum_reference(z, self.packed, self.omega, residual)


def _reference(src: Sources) -> Provider:
    m = ReferenceScaLearn(src).eval()
    return Provider(m, [m.omega])


def _torch(src: Sources) -> Provider:
    m = FusedScaLearn(src, "torch").eval()
    return Provider(m, [m.layer.omega])


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot be benchmarked here (None when it can)."""
    if device.type != "cuda":
        return (
            "triton needs a CUDA GPU; on CPU it would only run in the Triton interpreter "
            "(a correctness tool, orders of magnitude slower), which is not a benchmark"
        )
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'scalearn-fast[triton]')"
    if importlib.util.find_spec("scalearn_fast.ops.triton_backend") is None:
        return "scalearn_fast.ops.triton_backend is not in this build yet"
    return None


def _triton(src: Sources) -> Provider:
    reason = triton_unavailable_reason(src.w_down.device)
    if reason:
        raise ProviderUnavailable(reason)
    m = FusedScaLearn(src, "triton").eval()
    return Provider(m, [m.layer.omega], warmup=3)  # autotuning happens on the first calls


def _auto(src: Sources) -> Provider:
    """What a user gets by default: per shape class the faster of ``triton`` and ``torch``."""
    if src.w_down.device.type != "cuda":
        raise ProviderUnavailable("backend='auto' is the torch backend off CUDA (measured as `torch`)")
    reason = triton_unavailable_reason(src.w_down.device)
    if reason:
        raise ProviderUnavailable(reason)
    m = FusedScaLearn(src, "auto").eval()
    return Provider(m, [m.layer.omega], warmup=3)  # the choice is measured on the first calls


SCALEARN_PROVIDERS: dict[str, ProviderFactory] = {
    "naive": _naive,
    "reference": _reference,
    "compile": _compile,
    "torch": _torch,
    "triton": _triton,
    "auto": _auto,
}


# ---------------------------------------------------------------- AdapterFusion


def _fusion_linears(
    d: int, *, dtype: torch.dtype, device: torch.device, seed: int = 1
) -> tuple[nn.Linear, ...]:
    """Query/key Linear(d, d) with bias and value Linear(d, d) without, initialised as ``adapters``
    does (N(0, 0.02), zero bias; value = identity with 1e-6 off the diagonal), then jittered so
    the softmax is not uniform."""
    g = torch.Generator().manual_seed(seed)
    q = nn.Linear(d, d, device=device, dtype=dtype)
    k = nn.Linear(d, d, device=device, dtype=dtype)
    v = nn.Linear(d, d, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        for lin in (q, k):
            lin.weight.copy_(torch.randn(d, d, generator=g) * 0.02)
            lin.bias.copy_(torch.randn(d, generator=g) * 0.02)
        eye = torch.full((d, d), 1e-6)
        eye.fill_diagonal_(1.0)
        v.weight.copy_(eye + torch.randn(d, d, generator=g) * 1e-3)
    return q, k, v


class NaiveFusion(nn.Module):
    """AdapterFusion, "dynamic" config, as ``adapters`` computes it: the N adapter outputs
    stacked to [..., N, d], query = Q(z), keys = K(outputs), values = V(outputs) (value before
    the softmax, on every adapter), softmax over adapters (temperature 1), weighted sum,
    + residual. Score dropout is off (eval), as in the library's inference."""

    def __init__(self, src: Sources) -> None:
        super().__init__()
        self.adapters = _bottlenecks(src)
        self.query, self.key, self.value = _fusion_linears(
            src.d, dtype=src.w_down.dtype, device=src.w_down.device
        )

    def fusion_parameters(self) -> list[nn.Parameter]:
        return [*self.query.parameters(), *self.key.parameters(), *self.value.parameters()]

    def forward(self, z: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        ups = torch.stack([adapter(z) for adapter in self.adapters], dim=-2)  # [..., N, d]
        q = self.query(z).unsqueeze(-2)  # [..., 1, d]
        k = self.key(ups)
        v = self.value(ups)
        probs = F.softmax((q @ k.transpose(-2, -1)).squeeze(-2), dim=-1)  # [..., N]
        return (probs.unsqueeze(-2) @ v).squeeze(-2) + residual


class AdaptersLibraryFusion(nn.Module):
    """The ``adapters`` library's own ``BertFusion`` (DynamicAdapterFusionConfig), fed the way
    ``BottleneckLayer.compose_fuse`` feeds it: the adapter outputs stacked and permuted to
    [B, S, N, d]; same weights as ``NaiveFusion``."""

    def __init__(self, src: Sources) -> None:
        super().__init__()
        if not adapters_installed():
            raise ProviderUnavailable("the adapters package is not installed (pip install adapters)")
        from adapters.configuration import DynamicAdapterFusionConfig
        from adapters.methods.modeling import BertFusion

        self.adapters = _bottlenecks(src)
        d = src.d
        fusion = BertFusion(DynamicAdapterFusionConfig(), d, 0.1)
        q, k, v = _fusion_linears(d, dtype=src.w_down.dtype, device=src.w_down.device)
        fusion.query, fusion.key, fusion.value = q, k, v
        self.fusion = fusion.to(device=src.w_down.device, dtype=src.w_down.dtype)

    def fusion_parameters(self) -> list[nn.Parameter]:
        return list(self.fusion.parameters())

    def forward(self, z: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if z.dim() != 3:
            raise ValueError(
                f"the adapters fusion layer takes [B, S, d] inputs; got z of shape {list(z.shape)}"
            )
        up_list = torch.stack([adapter(z) for adapter in self.adapters]).permute(1, 2, 0, 3)
        return self.fusion(z, up_list, up_list, residual)


def _fusion_naive(src: Sources) -> Provider:
    m = NaiveFusion(src).eval()
    return Provider(m, m.fusion_parameters())


def _fusion_adapters(src: Sources) -> Provider:
    m = AdaptersLibraryFusion(src).eval()
    return Provider(m, m.fusion_parameters())


def fused_fusion_factory(backend: str) -> ProviderFactory:
    """``AdapterFusionLayer`` with ``backend`` at the same weights as ``NaiveFusion``
    (``_fusion_linears``); ``triton`` and ``auto`` need CUDA (``auto`` is ``torch`` elsewhere)."""

    def build(src: Sources) -> Provider:
        reason = triton_unavailable_reason(src.w_down.device) if backend in ("triton", "auto") else None
        if backend == "auto" and src.w_down.device.type != "cuda":
            reason = "backend='auto' is the torch backend off CUDA (measured as `torch`)"
        if reason:
            raise ProviderUnavailable(reason)
        m = FusedFusion(src, backend).eval()
        return Provider(m, m.layer.fusion_parameters(), warmup=1 if backend == "torch" else 3)

    return build


class FusedFusion(nn.Module):
    """``AdapterFusionLayer`` at ``NaiveFusion``'s weights; forward(z, residual) is
    the fusion alone (``compose``), as for the other fusion providers."""

    def __init__(self, src: Sources, backend: str) -> None:
        super().__init__()
        from ..layers_fusion import AdapterFusionLayer

        self.layer = AdapterFusionLayer(src.w_down, src.b_down, src.w_up, src.b_up, backend=backend)
        q, k, v = _fusion_linears(src.d, dtype=src.w_down.dtype, device=src.w_down.device)
        self.layer.query, self.layer.key, self.layer.value = q, k, v

    def forward(self, z: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.layer.compose(z, residual)


FUSION_PROVIDERS: dict[str, ProviderFactory] = {
    "naive": _fusion_naive,
    "adapters": _fusion_adapters,
    "torch": fused_fusion_factory("torch"),
    "triton": fused_fusion_factory("triton"),
    "auto": fused_fusion_factory("auto"),
}


def register_fusion_provider(name: str, factory: ProviderFactory) -> None:
    """Add (or replace) an AdapterFusion provider; the suite parametrizes over this dict."""
    FUSION_PROVIDERS[name] = factory


def register_scalearn_provider(name: str, factory: ProviderFactory) -> None:
    """Add (or replace) a ScaLearn provider."""
    SCALEARN_PROVIDERS[name] = factory
