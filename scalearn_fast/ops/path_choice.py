"""Measured choices between implementations of one op, cached per shape class.

Two users: the Triton backend's forward (the fused kernel or down + up projection, below) and
``auto_backend`` (the Triton kernels or the torch backend's cuBLAS GEMMs, forward and backward
separately). ``fastest(key, candidates)`` times each candidate once per key with
``triton.testing.do_bench`` and keeps the winner; ``choices()`` shows what was picked.

Which Triton forward path runs: the fused kernel (S on chip) or down + up projection.

Neither wins everywhere. The fused kernel saves writing and re-reading S (2·T·R elements) and
a launch, but its grid is over T only, so small T leaves most SMs idle, and at large R its
register-resident S forces small row tiles (no Hopper wgmma; docs/architecture.md). So on CUDA,
with autotuning on, the first call of each *shape class* times both paths (the way Triton's
autotuner times configs) and the faster one is kept for every later call of that class:

    class = (CUDA device index, dtype, d, R, next_pow2(T), row_scale?, save_pre?, ω folded?, residual?)

T is bucketed by powers of two, so a run with dynamic padding measures at most ~17 classes per
layer shape, ~0.1-0.3 s each, in its first steps. Where nothing can be measured (CPU / the
interpreter, autotune off, CUDA graph capture) a choice made earlier for the class still holds
(warm up before capturing a graph), else the fused kernel runs whenever it fits.
``USE_FUSED`` in ``triton_backend`` forces one path (True: fused when it fits, False: never).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

_CHOICES: dict[Hashable, str] = {}


def _can_measure(z: torch.Tensor) -> bool:
    from scalearn_fast._kernels import load_kernels

    k = load_kernels()
    autotune = k.scaled_adapter_sum.autotune_enabled()
    return z.is_cuda and autotune and not torch.cuda.is_current_stream_capturing()


def _time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` on the GPU (``triton.testing.do_bench``, which warms up first)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def shape_class(z: torch.Tensor, r: int, *flags: bool) -> tuple:
    t, d = z.shape
    bucket = 1 << max(t - 1, 0).bit_length()
    return (z.device.index, z.dtype, d, r, bucket, *flags)


def fused_is_faster(
    key: Hashable, fused: Callable[[], object], two_kernel: Callable[[], object], *, measure: bool = True
) -> bool:
    """The cached choice for ``key``, timing both paths the first time (ties go to fused)."""
    return fastest(key, {"fused": fused, "two_kernel": two_kernel}, measure=measure) == "fused"


def fastest(key: Hashable, candidates: dict[str, Callable[[], object]], *, measure: bool = True) -> str:
    """The name of the fastest candidate for ``key``, each timed the first time (ties go to
    the first listed); later calls only look the choice up. With ``measure=False`` (nothing can
    be timed now, e.g. during CUDA graph capture) a choice made earlier still holds, and an
    unseen key gets the first candidate without being cached."""
    if key not in _CHOICES:
        if not measure:
            return next(iter(candidates))
        times = {name: _time_ms(fn) for name, fn in candidates.items()}
        _CHOICES[key] = min(times, key=times.__getitem__)
    return _CHOICES[key]


def choice(key: Hashable) -> str | None:
    """The choice made for ``key``, or None if it has not been measured yet."""
    return _CHOICES.get(key)


def choices() -> dict[Hashable, str]:
    """A copy of the choices made so far (shape class -> the name picked), e.g. to log them."""
    return dict(_CHOICES)


def clear() -> None:
    _CHOICES.clear()
