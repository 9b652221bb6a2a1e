"""The MoSLD benchmark: a LoRA mixture at one attention projection (LLaMA-7B: d = 4096, r = 8,
N = 8, top-2, T = 4096 tokens), the fused op against the PEFT-style loop.

Providers (both with the same per-token top-k router, DropConnect off, the balance loss not
computed: what differs is the mixture itself):

- ``naive``: what stacking N PEFT LoRAs and weighting their outputs does: every expert its own
  ``A_n`` and ``B_n`` (two ``nn.Linear``), its own ``[T, d_out]`` output, weighted and summed;
- ``torch``: ``LoRAMixture`` (one shared ``A``, the fused op of ``ops/lora_mixture.py``).

Rows carry the timing and, for forward+backward, the bytes autograd keeps for the backward
(``saved_activation_bytes``); the report's "vs naive" columns compare them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers_lora_mixture import LoRAMixture
from ..ops.lora_mixture_gates import topk_gates
from .flops import OpCost
from .harness import Candidate, GroupRun, run_case_group
from .matrix import _BatchedCase
from .timing import saved_activation_bytes

KIND = "lora_mixture"
PROVIDERS = ("naive", "torch")


@dataclass(frozen=True)
class MixtureCase(_BatchedCase):
    d: int
    r: int
    n: int
    k: int
    batch: int
    seq: int
    dtype: torch.dtype
    ID: ClassVar[str] = "d{d}-r{r}-N{n}-k{k}-T{tokens}"


def mixture_cases(cuda: bool, quick: bool) -> list[MixtureCase]:
    """LLaMA-7B's attention projection (d = 4096, r = 8, N = 8, top-2) at T = 4096; the smoke run
    keeps that width at T = 256."""
    if quick:
        return [MixtureCase(4096, 8, 8, 2, 2, 128, torch.float32)]
    dtypes = (torch.bfloat16, torch.float32) if cuda else (torch.float32,)
    return [MixtureCase(4096, 8, 8, 2, 32, 128, dt) for dt in dtypes]


def lora_mixture_cost(tokens: int, d: int, r: int, n: int, *, elem_bytes: int, backward: bool) -> OpCost:
    """The fused mixture with dense gates (d_in = d_out = d): forward router 2TdN, shrink 2Tdr,
    expand 2TdNr (dense over N: zeros for the experts outside the top-k); backward G = grad·B_cat
    and dB (2TdNr each), dx and dA (2Tdr each), the router's dx and dW (2TdN each). Bytes: x and
    out (2Td), the weights (dr + Ndr + dN); backward adds grad_out, x and dx (3Td) and the
    weights and their gradients again."""
    t = tokens
    flops = 2 * t * d * n + 2 * t * d * r + 2 * t * d * n * r
    elems = 2 * t * d + d * r + n * d * r + d * n
    if backward:
        flops += 4 * t * d * n * r + 4 * t * d * r + 4 * t * d * n
        elems += 3 * t * d + 2 * (d * r + n * d * r + d * n)
    return OpCost(float(flops), float(elems * elem_bytes))


class PeftStyleLoop(nn.Module):
    """N LoRA experts as PEFT holds them (each its own down and up ``nn.Linear``), weighted per
    token by the same top-k router and summed, one ``[T, d]`` output per expert."""

    def __init__(self, d: int, r: int, n: int, k: int, scaling: float, *, device, dtype) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype, "bias": False}
        self.down = nn.ModuleList(nn.Linear(d, r, **kw) for _ in range(n))
        self.up = nn.ModuleList(nn.Linear(r, d, **kw) for _ in range(n))
        self.router = nn.Linear(d, n, **kw)
        self.k, self.scaling = k, scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates, _, _ = topk_gates(F.linear(x, self.router.weight), self.k)
        out = 0
        for i, (down, up) in enumerate(zip(self.down, self.up, strict=True)):
            out = out + gates[..., i : i + 1] * (self.scaling * up(down(x)))
        return out


def build_provider(name: str, case: MixtureCase, device: torch.device) -> nn.Module:
    """The module of provider ``name`` (random weights, non-zero up matrices), in eval mode."""
    gen = torch.Generator().manual_seed(0)
    kw = {"device": device, "dtype": case.dtype}
    scaling = 16 / case.r  # the paper's alpha = 16
    if name == "naive":
        module: nn.Module = PeftStyleLoop(case.d, case.r, case.n, case.k, scaling, **kw)
    elif name == "torch":
        module = LoRAMixture(
            case.d, case.d, num_experts=case.n, rank=case.r, alpha=16, top_k=case.k, dropconnect=0.0, **kw
        )
    else:
        raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS}")
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5).to(p.dtype))
    return module.eval()


def mixture_step(module: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], Any]:
    """fwd: inference under no_grad; fwdbwd: forward and backward for x and every parameter."""
    if mode == "fwd":

        def fwd() -> torch.Tensor:
            with torch.no_grad():
                return module(x)

        return fwd
    xg = x.detach().clone().requires_grad_(True)
    grad_out = torch.randn_like(x)
    inputs = [xg, *module.parameters()]

    def fwdbwd() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(module(xg), inputs, grad_out)

    return fwdbwd


def run_mixture_case(run: GroupRun, case: MixtureCase, mode: str) -> dict[str, dict[str, Any]]:
    """One group: both providers at ``case`` in ``mode``, timed interleaved, one row each."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(case.batch, case.seq, case.d, generator=gen).to(device=run.device, dtype=case.dtype)
    params = {"kind": KIND, "mode": mode, "case": case.id, "d": case.d, "r": case.r, "n": case.n}
    params.update(k=case.k, batch=case.batch, seq=case.seq)
    elem = x.element_size()
    cost = lora_mixture_cost(case.tokens, case.d, case.r, case.n, elem_bytes=elem, backward=mode == "fwdbwd")

    def candidate(name: str) -> Candidate:
        holder: dict[str, nn.Module] = {}

        def build() -> tuple[Callable[[], Any], int]:
            holder["m"] = m = build_provider(name, case, run.device)
            return mixture_step(m, x, mode), 1

        def saved() -> dict[str, Any]:
            if mode != "fwdbwd":
                return {}
            m = holder["m"]
            xg = x.detach().clone().requires_grad_(True)
            owned = [x, xg, *m.parameters(), *m.buffers()]
            return {"saved_activation_bytes": saved_activation_bytes(lambda: m(xg), owned)}

        return Candidate(name, build, extra=saved)

    return run_case_group(run, case, list(PROVIDERS), candidate, params=params, cost=cost)
