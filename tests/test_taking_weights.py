"""The weights forms of the entry points (``scaled_adapter_sum``, ``scaled_adapter_sum_bank``,
``adapter_fusion``) wrap their ``*_packed`` forms: same parameters after the sources,
every argument reaching the packed form, by position or by name."""

from __future__ import annotations

import inspect

import pytest
import torch

from scalearn_fast.ops import (
    adapter_fusion,
    adapter_fusion_packed,
    pack_sources,
    scaled_adapter_sum,
    scaled_adapter_sum_bank,
    scaled_adapter_sum_bank_packed,
    scaled_adapter_sum_packed,
)

PAIRS = [
    (scaled_adapter_sum, scaled_adapter_sum_packed),
    (scaled_adapter_sum_bank, scaled_adapter_sum_bank_packed),
    (adapter_fusion, adapter_fusion_packed),
]


def sources(n=3, r=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(n, r, d), (n, r), (n, d, r), (n, d)]
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]


@pytest.mark.parametrize("weights_fn, packed_fn", PAIRS, ids=lambda f: getattr(f, "__name__", ""))
def test_signature_is_the_packed_one_with_the_four_sources(weights_fn, packed_fn):
    got = list(inspect.signature(weights_fn).parameters.values())
    want = list(inspect.signature(packed_fn).parameters.values())
    assert [p.name for p in got[:5]] == ["z", "w_down", "b_down", "w_up", "b_up"]
    assert got[5:] == want[2:]  # names, kinds, defaults and annotations
    assert weights_fn.__name__ == weights_fn.__qualname__ != packed_fn.__name__
    assert weights_fn.__module__ == packed_fn.__module__
    assert inspect.cleandoc(packed_fn.__doc__) in weights_fn.__doc__


def test_every_argument_reaches_the_packed_form_by_name_or_position():
    src = sources()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    omega = torch.rand(3, 8, generator=g, dtype=torch.float64)
    res = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    rs = torch.rand(2, 5, 3, generator=g, dtype=torch.float64)
    want = scaled_adapter_sum_packed(
        z, pack_sources(*src), omega, res, activation="gelu", backend="torch", row_scale=rs
    )
    names = dict(zip(["w_down", "b_down", "w_up", "b_up"], src, strict=True))
    by_name = scaled_adapter_sum(
        z=z, **names, omega=omega, residual=res, activation="gelu", backend="torch", row_scale=rs
    )
    by_position = scaled_adapter_sum(z, *src, omega, res, activation="gelu", backend="torch", row_scale=rs)
    torch.testing.assert_close(by_name, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(by_position, want, rtol=1e-12, atol=1e-12)
    # the defaults are the packed form's: relu, no residual, no row_scale
    torch.testing.assert_close(
        scaled_adapter_sum(z, *src, omega), scaled_adapter_sum_packed(z, pack_sources(*src), omega)
    )
    with pytest.raises(TypeError, match="row_scal"):
        scaled_adapter_sum(z, *src, omega, row_scal=rs)  # a misspelt option is refused, not dropped


def test_bank_form_passes_the_task_ids():
    src = sources()
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 8, generator=g, dtype=torch.float64)
    bank = torch.rand(4, 3, 8, generator=g, dtype=torch.float64)
    tasks = torch.tensor([0, 3, 1, 1, 2, 0])
    want = scaled_adapter_sum_bank_packed(z, pack_sources(*src), bank, tasks, backend="torch")
    got = scaled_adapter_sum_bank(z, *src, omega_bank=bank, task_index=tasks, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
