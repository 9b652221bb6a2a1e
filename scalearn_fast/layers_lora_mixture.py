"""``LoRAMixture``: N LoRA experts beside one frozen Linear layer, mixed per token by a router.

    h = W0·x + scaling · Σ_{n ∈ top-k(x)} g_n(x) · B_n · Ã_n · x

MoSLD (shared down): every ``Ã_n`` is the one trainable down matrix ``A [r, d_in]`` (with
DropConnect in training: ``Ã = M ⊙ A / (1 − p)``, M ~ Bernoulli(1 − p) per entry, fresh every
call); each expert has its own up matrix ``B_n [d_out, r]``, zero-initialised, and
``scaling = alpha / r``. The router is ``softmax(W_g·x)`` (no bias), top-k kept and
renormalised (``ops/lora_mixture_gates.py``); in training each call leaves its balance loss in
``last_balance_loss``.

Fixed experts (PEFT LoRA folders): ``LoRAMixture.from_experts`` takes per-expert ``A_n``,
``B_n`` and scalings as frozen buffers (ranks padded to the largest with zeros, each expert's
own scaling folded into its ``B_n``: exact), and only the router trains.

``fixed_gates`` (``set_fixed_gates``) replaces the router: the N given weights, used as they
are (not normalised), for every token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops.lora_mixture import LORA_MIXTURE_BACKENDS, lora_mixture
from .ops.lora_mixture_gates import balance_loss, check_top_k, topk_gates

Tensor = torch.Tensor


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {name}={value!r}")
    return value


def check_mixture_options(
    num_experts: int, rank: int, top_k: int, dropconnect: float, balance_weight: float, backend: str
) -> None:
    """A ValueError naming the argument for any bad option of a LoRA mixture."""
    _check_positive_int("num_experts", num_experts)
    _check_positive_int("rank", rank)
    check_top_k(top_k, num_experts)
    if not isinstance(dropconnect, (int, float)) or not 0.0 <= dropconnect < 1.0:
        raise ValueError(f"dropconnect must be a probability in [0, 1); got dropconnect={dropconnect!r}")
    if not isinstance(balance_weight, (int, float)) or not balance_weight >= 0.0:
        raise ValueError(f"balance_loss must be a weight >= 0; got balance_loss={balance_weight!r}")
    if backend not in LORA_MIXTURE_BACKENDS:
        raise ValueError(f"backend must be one of {LORA_MIXTURE_BACKENDS}; got backend={backend!r}")


class LoRAMixture(nn.Module):
    """The mixture term of one Linear site (``forward(x)`` returns it, without ``W0·x``).

    Args:
        in_features, out_features: the Linear layer's d_in and d_out.
        num_experts: N.
        rank: r of every expert.
        alpha: LoRA alpha; ``scaling = alpha / rank``.
        shared_down: one down matrix for all experts (MoSLD) or one per expert.
        top_k: experts kept per token (1 <= top_k <= N).
        dropconnect: DropConnect probability on the down matrix in training mode.
        balance_loss: the weight of this layer's balance loss in ``lora_mixture_loss``.
        backend: ``torch`` (the fused op), ``triton``, ``auto`` (ops/lora_mixture.py) or
            ``reference`` (the float64 loop).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        num_experts: int,
        rank: int,
        alpha: float,
        shared_down: bool = True,
        top_k: int = 2,
        dropconnect: float = 0.1,
        balance_loss: float = 0.01,
        backend: str = "torch",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_mixture_options(num_experts, rank, top_k, dropconnect, balance_loss, backend)
        _check_positive_int("in_features", in_features)
        _check_positive_int("out_features", out_features)
        kw = {"device": device, "dtype": dtype}
        down_rows = rank if shared_down else num_experts * rank
        self.a_down = nn.Parameter(torch.empty(down_rows, in_features, **kw))
        nn.init.kaiming_uniform_(self.a_down, a=math.sqrt(5))  # as PEFT initialises lora_A
        self.b_up = nn.Parameter(torch.zeros(num_experts, out_features, rank, **kw))
        scaling = alpha / rank
        self._setup(in_features, num_experts, rank, scaling, top_k, dropconnect, balance_loss, backend, kw)

    def _setup(self, d_in, n, rank, scaling, top_k, dropconnect, balance_weight, backend, kw) -> None:
        self.num_experts, self.rank, self.scaling = n, rank, float(scaling)
        self.top_k, self.dropconnect, self.balance_weight = top_k, float(dropconnect), float(balance_weight)
        self.backend = backend
        self.router = nn.Linear(d_in, n, bias=False, **kw)
        self.register_buffer("fixed_gates", None, persistent=False)
        self.last_balance_loss: Tensor | None = None

    @classmethod
    def from_experts(
        cls,
        a_downs: Sequence[Tensor],
        b_ups: Sequence[Tensor],
        scalings: Sequence[float],
        *,
        top_k: int = 2,
        dropconnect: float = 0.0,
        balance_loss: float = 0.01,
        backend: str = "torch",
        dtype: torch.dtype | None = None,
    ) -> LoRAMixture:
        """A mixture over N fixed LoRAs (frozen buffers) with a trainable router: expert n is
        ``scalings[n] · B_n · A_n`` for ``a_downs[n] [r_n, d_in]``, ``b_ups[n] [d_out, r_n]``."""
        n = len(a_downs)
        if n == 0 or len(b_ups) != n or len(scalings) != n:
            raise ValueError(
                f"from_experts needs N >= 1 experts with one A, B and scaling each; got "
                f"{len(a_downs)} A, {len(b_ups)} B, {len(scalings)} scalings"
            )
        d_in, d_out = a_downs[0].shape[1], b_ups[0].shape[0]
        for i, (a, b) in enumerate(zip(a_downs, b_ups, strict=True)):
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != d_in or b.shape != (d_out, a.shape[0]):
                raise ValueError(
                    f"expert {i}: A {list(a.shape)} and B {list(b.shape)} must be [r, {d_in}] and "
                    f"[{d_out}, r] (d_in, d_out of expert 0)"
                )
        r = max(a.shape[0] for a in a_downs)
        check_mixture_options(n, r, top_k, dropconnect, balance_loss, backend)
        dtype = dtype or a_downs[0].dtype
        like = {"device": a_downs[0].device, "dtype": dtype}
        a_cat = torch.zeros(n * r, d_in, **like)
        b_up = torch.zeros(n, d_out, r, **like)
        for i, (a, b, s) in enumerate(zip(a_downs, b_ups, scalings, strict=True)):
            a_cat[i * r : i * r + a.shape[0]] = a.to(**like)
            b_up[i, :, : b.shape[1]] = (float(s) * b.double()).to(**like)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.register_buffer("a_down", a_cat)
        self.register_buffer("b_up", b_up)
        self._setup(d_in, n, r, 1.0, top_k, dropconnect, balance_loss, backend, like)
        return self

    @property
    def shared_down(self) -> bool:
        return self.a_down.shape[0] == self.rank and self.num_experts > 1

    def set_fixed_gates(self, gates: Tensor | Sequence[float] | None) -> None:
        """Use ``gates [N]`` for every token instead of the router (None: the router again)."""
        if gates is None:
            self.fixed_gates = None
            return
        g = torch.as_tensor(gates, dtype=self.a_down.dtype, device=self.a_down.device)
        if g.shape != (self.num_experts,):
            raise ValueError(f"fixed gates must have shape [N={self.num_experts}]; got {list(g.shape)}")
        self.fixed_gates = g.clone()

    def gates(self, x: Tensor) -> Tensor:
        """The dense gates ``[..., N]`` for ``x [..., d_in]``; in training (router gates) also
        sets ``last_balance_loss``."""
        if self.fixed_gates is not None:
            self.last_balance_loss = None
            return self.fixed_gates.to(x.dtype).expand(*x.shape[:-1], self.num_experts)
        g, probs, chosen = topk_gates(F.linear(x, self.router.weight), self.top_k)
        self.last_balance_loss = balance_loss(probs, chosen, self.top_k) if self.training else None
        return g

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, torch.Tensor) or x.shape[-1] != self.a_down.shape[1]:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [..., d_in={self.a_down.shape[1]}]; got {got}")
        x = x.to(self.a_down.dtype)
        a = self.a_down
        if self.training and self.dropconnect > 0:
            a = F.dropout(a, self.dropconnect)  # M ⊙ A / (1 − p)
        return lora_mixture(x, a, self.b_up, self.gates(x), self.scaling, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, rank={self.rank}, shared_down={self.shared_down}, "
            f"top_k={self.top_k}, scaling={self.scaling:g}, dropconnect={self.dropconnect:g}, "
            f"in_features={self.a_down.shape[1]}, out_features={self.b_up.shape[1]}, backend={self.backend!r}"
        )
