"""attach_lora_mixture on real model classes: BERT query/value and grouped-query LLaMA q_proj/v_proj
(d_out != d_in) against the float64 loop site by site, freezing, detach, the balance loss, a
training step that learns, torch.compile, and the errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

from scalearn_fast.layers_lora_mixture import LoRAMixture
from scalearn_fast.models.lora_mixture import (
    attach_lora_mixture,
    detach_lora_mixture,
    lora_mixture_layers,
    lora_mixture_loss,
    lora_mixture_parameters,
)
from scalearn_fast.ops.lora_mixture_gates import topk_gates
from scalearn_fast.ops.lora_mixture_reference import lora_mixture_reference

BERT = BertConfig(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=64
)
LLAMA = LlamaConfig(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=64,
)  # fmt: skip


def _ids(batch=2, length=6, seed=5):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def _randomise_up(model):
    """Non-zero B_n (they start at zero), so the mixture changes the output."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_mixture_layers(model):
            layer.b_up.copy_(torch.randn(layer.b_up.shape, generator=gen) * 0.2)


def _site_oracle(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """W0·x + b + the float64 loop of the site's mixture with its own router's top-k gates."""
    layer = linear.lora_mixture
    logits = x.double() @ layer.router.weight.double().T
    gates, _, _ = topk_gates(logits, layer.top_k)
    mix = lora_mixture_reference(x.double(), layer.a_down, layer.b_up, gates, layer.scaling)
    base = x.double() @ linear.weight.double().T + (0 if linear.bias is None else linear.bias.double())
    return base + mix


@pytest.mark.parametrize(
    "make, sites",
    [(lambda: BertModel(BERT), ("query", "value")), (lambda: LlamaModel(LLAMA), ("q_proj", "v_proj"))],
    ids=["bert", "llama_gqa"],
)
def test_patched_sites_match_the_loop(make, sites):
    torch.manual_seed(0)
    model = make().eval()
    attach_lora_mixture(model, sites=sites, num_experts=4, rank=3, alpha=6)
    _randomise_up(model)
    linears = {n: m for n, m in model.named_modules() if hasattr(m, "lora_mixture")}
    assert len(linears) == 2 * 2 and all(n.rsplit(".", 1)[-1] in sites for n in linears)
    if "v_proj" in sites:  # grouped-query: v_proj maps 32 -> 16
        v = next(m for n, m in linears.items() if n.endswith("v_proj"))
        assert (v.in_features, v.out_features) == (32, 16)
    inputs = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, out, n=n: inputs.__setitem__(n, (a[0], out)))
        for n, m in linears.items()
    ]
    with torch.no_grad():
        model(_ids())
    for h in hooks:
        h.remove()
    for name, (x, out) in inputs.items():
        torch.testing.assert_close(out.double(), _site_oracle(linears[name], x), rtol=1e-5, atol=1e-5)


def test_freezes_the_base_and_detach_restores():
    torch.manual_seed(0)
    model = BertModel(BERT).eval()
    with torch.no_grad():
        want = model(_ids()).last_hidden_state
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    attach_lora_mixture(model, num_experts=3, rank=2, alpha=4, top_k=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_mixture." in n}
    assert len(lora_mixture_parameters(model)) == 3 * 4  # A, B, router at 4 sites
    with torch.no_grad():  # B starts at zero: the model computes what it did
        torch.testing.assert_close(model(_ids()).last_hidden_state, want)
    copied = copy.deepcopy(model)
    assert len(lora_mixture_layers(copied)) == 4
    detach_lora_mixture(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(".lora_mixture." in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).last_hidden_state, want)


def test_balance_loss_and_dropconnect_in_training_only():
    torch.manual_seed(0)
    model = attach_lora_mixture(BertModel(BERT), num_experts=4, rank=2, alpha=4, balance_loss=0.5)
    _randomise_up(model)
    model.train()
    model(_ids())
    layers = lora_mixture_layers(model)
    assert all(layer.last_balance_loss is not None for layer in layers)
    want = sum(0.5 * layer.last_balance_loss for layer in layers)
    torch.testing.assert_close(lora_mixture_loss(model), want)
    assert 1.0 - 1e-6 <= layers[0].last_balance_loss.item() <= 4.0
    x = torch.randn(5, 32)
    assert not torch.equal(layers[0](x), layers[0](x))  # a fresh DropConnect mask every call
    model.eval()
    model(_ids())
    assert lora_mixture_loss(model).item() == 0.0
    torch.testing.assert_close(layers[0](x), layers[0](x))


def test_training_step_learns_and_touches_only_the_mixture():
    """A tiny regression task on a frozen random BERT: 12 Adam steps on the task loss plus the
    balance loss lower the task loss; only mixture parameters ever get a gradient."""
    torch.manual_seed(0)
    model = attach_lora_mixture(BertModel(BERT), num_experts=4, rank=4, alpha=8, dropconnect=0.1).train()
    ids = _ids(batch=8, length=5, seed=2)
    target = torch.randn(8, 5, 32, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.Adam(lora_mixture_parameters(model), lr=2e-2)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        task = (model(ids).last_hidden_state - target).square().mean()
        (task + lora_mixture_loss(model)).backward()
        losses.append(task.item())
        # every step: gradients only on the mixture
        assert all(p.grad is None for n, p in model.named_parameters() if ".lora_mixture." not in n)
        opt.step()
    assert all(layer.router.weight.grad.abs().sum() > 0 for layer in lora_mixture_layers(model))
    assert losses[-1] < 0.97 * losses[0], losses


def test_torch_compile_fullgraph_matches_eager():
    """A tiny attention-like block with q/v Linears, compiled with fullgraph=True: the same output
    and gradients as eager (the custom op traces with its fake implementation)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 8, bias=False)

        def forward(self, x):
            return torch.tanh(self.q_proj(x)).sum(-1, keepdim=True) * self.v_proj(x)

    torch.manual_seed(0)
    model = attach_lora_mixture(Block(), sites=("q_proj", "v_proj"), num_experts=3, rank=2, alpha=4)
    _randomise_up(model)
    model.eval()
    x = torch.randn(2, 5, 16, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    want = model(x)
    got = compiled(x)
    torch.testing.assert_close(got, want)
    params = [x, *lora_mixture_parameters(model)]
    g_want = torch.autograd.grad(want.sum(), params)
    g_got = torch.autograd.grad(got.sum(), params)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b)


def test_errors_name_the_argument():
    model = BertModel(BERT)
    with pytest.raises(ValueError, match=r"'q_proj' matches no nn.Linear.*query"):
        attach_lora_mixture(model, sites=("query", "q_proj"), num_experts=3, rank=2, alpha=4)
    with pytest.raises(ValueError, match="top_k"):
        attach_lora_mixture(model, num_experts=2, rank=2, alpha=4, top_k=3)
    with pytest.raises(ValueError, match="rank"):
        attach_lora_mixture(model, num_experts=2, rank=0, alpha=4)
    with pytest.raises(ValueError, match="dropconnect"):
        attach_lora_mixture(model, num_experts=2, rank=2, alpha=4, dropconnect=1.0)
    with pytest.raises(ValueError, match="num_experts, rank and alpha are required"):
        attach_lora_mixture(model, num_experts=2)
    assert not any(p.requires_grad is False for p in model.parameters())  # nothing half-attached
    attach_lora_mixture(model, num_experts=2, rank=2, alpha=4)
    with pytest.raises(RuntimeError, match="already attached"):
        attach_lora_mixture(model, num_experts=2, rank=2, alpha=4)
    layer = lora_mixture_layers(model)[0]
    with pytest.raises(ValueError, match=r"x must be \[..., d_in=32\]"):
        layer(torch.randn(3, 31))
    with pytest.raises(ValueError, match="fixed gates must have shape"):
        layer.set_fixed_gates([1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="in_features"):
        LoRAMixture(0, 4, num_experts=2, rank=2, alpha=4)
