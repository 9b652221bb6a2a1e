"""The LoRA-mixture op with ``backend="triton"`` (the Triton expand kernels, under the CPU
interpreter here) against the float64 per-expert loop, values and gradients; the calls the kernels
do not take (float64, ranks past the backward's ``MAX_RANK``) run the torch expand instead; and a
layer and ``torch.compile`` on that backend."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from scalearn_fast.layers_lora_mixture import LoRAMixture  # noqa: E402
from scalearn_fast.ops.lora_mixture import lora_mixture  # noqa: E402
from scalearn_fast.ops.lora_mixture_gates import topk_gates  # noqa: E402
from scalearn_fast.ops.lora_mixture_reference import lora_mixture_reference  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.float64: 1e-12}


def _inputs(t, n, r, d_in, d_out, shared, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d_in, generator=gen, dtype=torch.float64)
    a = torch.randn(r if shared else n * r, d_in, generator=gen, dtype=torch.float64) / d_in**0.5
    b = torch.randn(n, d_out, r, generator=gen, dtype=torch.float64) / r**0.5
    g, _, _ = topk_gates(torch.randn(t, n, generator=gen, dtype=torch.float64), min(2, n))
    return [v.to(dtype).requires_grad_(True) for v in (x, a, b, g)]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the Triton launchers' calls (so a silent fall-back to torch fails a test)."""
    from scalearn_fast.ops.lora_mixture_triton import _kernels

    module, calls = _kernels(), {"forward": 0, "backward": 0}
    for name, key in (("lora_mixture_expand", "forward"), ("lora_mixture_expand_backward", "backward")):
        launcher = getattr(module, name)

        def spy(*args, _launcher=launcher, _key=key, **kwargs):
            calls[_key] += 1
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


def _check(shape, shared, dtype, scaling=1.5):
    x, a, b, g = _inputs(*shape, shared, dtype)
    out = lora_mixture(x, a, b, g, scaling, backend="triton")
    ref_in = [v.detach().double().requires_grad_(True) for v in (x, a, b, g)]
    ref = lora_mixture_reference(*ref_in, scaling)
    assert out.dtype == dtype and out.shape == (shape[0], shape[4])
    tol = TOL[dtype]
    assert (out.double() - ref).abs().max().item() <= tol * (ref.abs().max().item() + 1.0)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, (x, a, b, g), grad_out.to(dtype))
    refs = torch.autograd.grad(ref, ref_in, grad_out)
    for name, got, want in zip(("x", "a_down", "b_up", "gates"), grads, refs, strict=True):
        assert got.dtype == dtype
        err = (got.double() - want).abs().max().item()
        assert err <= tol * (want.abs().max().item() + 1.0), f"d{name}: {err}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_expert"])
@pytest.mark.parametrize("shape", [(1, 3, 2, 5, 4), (19, 4, 8, 12, 6)], ids=["T1-r2", "T19-r8-dout6"])
def test_triton_backend_matches_float64_loop(shape, shared, dtype, kernel_calls):
    _check(shape, shared, dtype)
    assert kernel_calls == {"forward": 1, "backward": 1}


def test_float64_runs_the_torch_expand(kernel_calls):
    _check((5, 3, 2, 4, 3), True, torch.float64)
    assert kernel_calls == {"forward": 0, "backward": 0}


def test_rank_past_the_backward_kernel_runs_the_torch_backward(kernel_calls):
    from scalearn_fast.ops.lora_mixture_triton import _kernels

    r = _kernels().MAX_RANK + 1  # next_pow2(r) = 2·MAX_RANK: the grad kernel refuses it
    _check((3, 1, r, 4, 3), True, torch.float32)
    assert kernel_calls == {"forward": 1, "backward": 0}


def test_layer_on_the_triton_backend_matches_torch_and_compiles():
    torch.manual_seed(0)
    layers = {
        name: LoRAMixture(
            12, 6, num_experts=4, rank=8, alpha=16, top_k=2, dropconnect=0.0, backend=name
        ).eval()
        for name in ("torch", "triton")
    }
    with torch.no_grad():
        for layer in layers.values():
            layer.b_up.normal_()
        layers["triton"].load_state_dict(layers["torch"].state_dict())
    x = torch.randn(2, 5, 12)
    want = layers["torch"](x)
    got = layers["triton"](x)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    compiled = torch.compile(layers["triton"], backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), want, rtol=2e-5, atol=2e-5)


def test_backend_errors():
    x, a, b, g = _inputs(2, 2, 2, 3, 3, True, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        lora_mixture(x, a, b, g, 1.0, backend="cuda")
