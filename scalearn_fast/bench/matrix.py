"""Which shapes the suite runs: the full matrix on a GPU, a reduced one on CPU, a smoke one
with ``--bench-quick`` (or ``SCALEARN_BENCH_QUICK=1``).

Tokens T = batch x seq with seq 128 (GLUE-style), so T sweeps change the batch. ``case_rank``
orders a run: the default shape first, then the N sweep, the T sweep, the rest (a run with a
time budget measures what matters most before the budget ends).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

SEQ = 128


class _BatchedCase:
    """What layer and model cases share: ``batch`` sequences of ``seq`` tokens in ``dtype``, and
    an ``id`` made of the class's ``ID`` pattern (over its fields and ``tokens``) and the dtype."""

    ID: ClassVar[str]
    batch: int
    seq: int
    dtype: torch.dtype

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def id(self) -> str:
        values = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        return f"{self.ID.format(**values, tokens=self.tokens)}-{str(self.dtype).removeprefix('torch.')}"


@dataclass(frozen=True)
class LayerCase(_BatchedCase):
    d: int
    r: int
    n: int
    batch: int
    seq: int
    dtype: torch.dtype
    ID: ClassVar[str] = "d{d}-r{r}-N{n}-T{tokens}"


@dataclass(frozen=True)
class ModelCase(_BatchedCase):
    layers: int
    d: int
    heads: int
    ffn: int
    n: int
    batch: int
    seq: int
    dtype: torch.dtype
    ID: ClassVar[str] = "L{layers}-d{d}-N{n}-B{batch}xS{seq}"


DEFAULT_SHAPE = {"d": 768, "n": 8, "tokens": 4096}


def large_bottleneck_case(dtype: torch.dtype, tokens: int = 4096) -> LayerCase:
    """Translation-sized adapters (mBART-large width, r = 1024 per source): R = N·r = 8192, far
    past d, where the backward recomputes P instead of keeping it (ops/saved_state.py)."""
    return LayerCase(1024, 1024, 8, tokens // SEQ, SEQ, dtype)


def case_rank(case: LayerCase | ModelCase) -> int:
    """0 default shape (and model cases), 1 N sweep, 2 T sweep, 3 anything else."""
    if isinstance(case, ModelCase):
        return 0
    if not isinstance(case, LayerCase):  # task-bank cases run after the rest
        return 3
    d, n = case.d == DEFAULT_SHAPE["d"], case.n == DEFAULT_SHAPE["n"]
    t = case.tokens == DEFAULT_SHAPE["tokens"]
    if d and n and t:
        return 0
    if d and t:
        return 1
    if d and n:
        return 2
    return 3


def is_default(case: LayerCase) -> bool:
    return case_rank(case) == 0


def model_modes(cuda: bool) -> list[str]:
    """Model-level modes: inference, a training step, and on CUDA inference replayed from a
    captured CUDA graph (host time out of the picture)."""
    return ["infer", "infer_graph", "train"] if cuda else ["infer", "train"]


def _case(d: int, n: int, tokens: int, dtype: torch.dtype, seq: int = SEQ) -> LayerCase:
    seq = min(seq, tokens)
    return LayerCase(d, d // 16, n, tokens // seq, seq, dtype)


def _dedup(cases: list[LayerCase]) -> list[LayerCase]:
    return list(dict.fromkeys(cases))


def scalearn_cases(cuda: bool, quick: bool) -> list[LayerCase]:
    if quick:
        return _dedup([_case(64, n, t, torch.float32) for n in (2, 4) for t in (128, 256)])
    if cuda:
        dt = torch.bfloat16
        cases = [_case(768, 8, 4096, dt)]
        cases += [_case(768, n, 4096, dt) for n in (2, 4, 8, 16, 32)]
        cases += [_case(768, 8, t, dt) for t in (128, 512, 2048, 4096, 16384, 65536)]
        cases += [_case(d, 8, t, dt) for d in (768, 1024, 4096) for t in (4096, 16384)]
        cases.append(large_bottleneck_case(dt))
        return _dedup(cases)
    dt = torch.float32
    cases = [_case(768, 8, 4096, dt)]
    cases += [_case(768, n, 4096, dt) for n in (2, 4, 16)]
    cases += [_case(768, 8, t, dt) for t in (512, 1024, 2048)]
    cases.append(large_bottleneck_case(dt))
    return _dedup(cases)


def fusion_cases(cuda: bool, quick: bool) -> list[LayerCase]:
    if quick:
        return [_case(64, 2, 128, torch.float32)]
    if cuda:
        dt = torch.bfloat16
        cases = [_case(768, 8, 4096, dt)]
        cases += [_case(768, n, 4096, dt) for n in (2, 4, 16, 32)]
        cases += [_case(768, 8, t, dt) for t in (512, 2048, 16384, 65536)]
        cases += [_case(d, 8, 4096, dt) for d in (1024, 4096)]
        return _dedup(cases)
    # the library's fusion costs ~20x ScaLearn's FLOPs: two shapes keep the CPU run short
    return [_case(768, 8, 4096, torch.float32), _case(768, 8, 1024, torch.float32)]


def model_cases(cuda: bool, quick: bool) -> list[ModelCase]:
    if quick:
        return [ModelCase(1, 64, 2, 256, 2, 2, 32, torch.float32)]
    if cuda:
        return [ModelCase(12, 768, 12, 3072, 8, 32, 128, torch.bfloat16)]  # RoBERTa-base, GLUE batch
    return [ModelCase(2, 768, 12, 3072, 8, 8, 128, torch.float32)]  # RoBERTa-base width, 2 layers
