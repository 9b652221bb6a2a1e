"""Model-level variants: a RoBERTa-shaped encoder (random weights from a config, no download)
plain, with ScaLearn (naive loop or fused) after every FFN output, or with AdapterFusion.

Every variant runs with dropout off (config dropout 0, eval mode) so that the timings differ
only by the composition. A training step is forward + cross-entropy on a 2-way head over the
first token + backward + AdamW step over the trainable parameters; the base weights are frozen:
- plain: the head and each layer's FFN-output LayerNorm train: the backward then reaches as deep
  as ω's does (layer 0's FFN output) and no deeper, so the overhead compares like with like
  (with no trainable encoder parameter the backward would stop at the head);
- ScaLearn: ω of every layer + the head;  AdapterFusion: the fusion layers + the head.

``infer_graph`` (CUDA): the inference step captured once in a CUDA graph and replayed, so the
host's Python, dispatch and launch time leave the timing and what remains is the GPU's work.
The graph holds the embeddings and the encoder stack; the attention mask is left out as the
eager model leaves it out for an all-ones mask (its all-ones check reads the GPU, which a
capture cannot). The replay is checked against the eager output before it is timed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .flops import case_cost
from .harness import Candidate, GroupRun, StepInfo, info_candidate, run_case_group
from .matrix import ModelCase
from .providers import NaiveScaLearn, ProviderUnavailable, adapters_installed, make_sources

MODEL_VARIANTS = ("plain", "scalearn_naive", "scalearn_fused", "fusion_adapters", "fusion_fused")


def _config(case: ModelCase):
    from transformers import RobertaConfig

    return RobertaConfig(
        vocab_size=50265,
        hidden_size=case.d,
        num_hidden_layers=case.layers,
        num_attention_heads=case.heads,
        intermediate_size=case.ffn,
        max_position_embeddings=max(514, case.seq + 2),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


class PatchedOutput(nn.Module):
    """A RobertaOutput (dense -> dropout -> LN(h + x)) with a composition in front of the LN:
    ``LN(compose(LN(h + x), h + x))`` (docs/design.md)."""

    def __init__(self, orig: nn.Module, composer: nn.Module) -> None:
        super().__init__()
        self.dense, self.dropout, self.LayerNorm = orig.dense, orig.dropout, orig.LayerNorm
        self.composer = composer

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        pre = self.dropout(self.dense(hidden_states)) + input_tensor
        return self.LayerNorm(self.composer(self.LayerNorm(pre), pre))


def layer_sources(case: ModelCase, layer: int):
    """The N random sources of one layer (the same for every variant: seeded by layer)."""
    return make_sources(case.n, case.d, case.d // 16, dtype=case.dtype, device="cpu", seed=100 + layer)


def local_attach(model: nn.Module, case: ModelCase, make: Callable[..., nn.Module]) -> list[nn.Parameter]:
    """Swap every layer's FFN output module for a ``PatchedOutput`` around ``make(sources)``:
    how the naive loop is put into the model (the product's ``attach_*`` patch the real thing).
    Returns the ω's."""
    omegas = []
    for i, layer in enumerate(model.encoder.layer):
        composer = make(layer_sources(case, i))
        layer.output = PatchedOutput(layer.output, composer)
        omegas.append(composer.omega if hasattr(composer, "omega") else composer.layer.omega)
    return omegas


def product_sources(model: nn.Module, case: ModelCase) -> dict[str, dict[int, tuple]]:
    """``{name: {layer: (w_down, b_down, w_up, b_up)}}``, the in-memory form ``attach_*`` take."""
    per_layer = [layer_sources(case, i) for i in range(len(model.encoder.layer))]
    return {
        f"src{k}": {i: (s.w_down[k], s.b_down[k], s.w_up[k], s.b_up[k]) for i, s in enumerate(per_layer)}
        for k in range(case.n)
    }


def _add_fusion(model: nn.Module, case: ModelCase) -> list[nn.Parameter]:
    if not adapters_installed():
        raise ProviderUnavailable("the adapters package is not installed (pip install adapters)")
    import adapters
    from adapters.composition import Fuse

    adapters.init(model)
    names = [f"src{i}" for i in range(case.n)]
    for name in names:
        model.add_adapter(name, config="seq_bn")
    fuse = Fuse(*names)
    model.add_adapter_fusion(fuse, config="dynamic")
    model.set_active_adapters(fuse)
    model.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if "adapter_fusion_layer" in n]
    for p in params:
        p.requires_grad_(True)
    return params


@dataclass
class ModelUnderTest:
    encoder: nn.Module
    head: nn.Linear
    trainable: list[nn.Parameter]
    attach: str  # how the composition was attached


def build_model(variant: str, case: ModelCase, device: torch.device) -> ModelUnderTest:
    """The encoder for ``variant`` with frozen base weights and its trainable parameters."""
    from transformers import RobertaModel

    torch.manual_seed(0)
    model = RobertaModel(_config(case), add_pooling_layer=False)
    model.requires_grad_(False)
    attach = "none"
    if variant == "plain":
        trainable = [layer.output.LayerNorm.weight for layer in model.encoder.layer]
        trainable += [layer.output.LayerNorm.bias for layer in model.encoder.layer]
        for p in trainable:
            p.requires_grad_(True)
    elif variant == "scalearn_naive":
        trainable = local_attach(model, case, NaiveScaLearn)
        attach = "local patcher (NaiveScaLearn)"
    elif variant == "scalearn_fused":
        from ..models import attach_scalearn
        from ..models.scalearn import omega_parameters

        attach_scalearn(model, product_sources(model, case), backend="auto")
        trainable = omega_parameters(model)
        attach = "scalearn_fast.attach_scalearn(backend=auto)"
    elif variant == "fusion_fused":
        from ..models import attach_fusion

        attach_fusion(model, product_sources(model, case), backend="auto")
        trainable = [p for p in model.parameters() if p.requires_grad]
        attach = "scalearn_fast.attach_fusion(backend=auto)"
    elif variant == "fusion_adapters":
        trainable = _add_fusion(model, case)
        attach = "adapters library (Fuse, dynamic)"
    else:
        raise ValueError(f"variant must be one of {MODEL_VARIANTS}; got {variant!r}")
    model = model.to(device=device, dtype=case.dtype).eval()
    head = nn.Linear(case.d, 2).to(device=device, dtype=case.dtype)
    return ModelUnderTest(model, head, [*trainable, *head.parameters()], attach)


def inference_step(m: ModelUnderTest, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        with torch.no_grad():
            return m.encoder(input_ids=ids).last_hidden_state

    return step


def train_step(m: ModelUnderTest, ids: torch.Tensor, labels: torch.Tensor) -> Callable[[], torch.Tensor]:
    opt = torch.optim.AdamW(m.trainable, lr=1e-5)

    def step() -> torch.Tensor:
        hidden = m.encoder(input_ids=ids).last_hidden_state
        loss = F.cross_entropy(m.head(hidden[:, 0]).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def graph_inference_step(m: ModelUnderTest, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The inference step captured in a CUDA graph; calling it replays the graph. Raises
    ``ProviderUnavailable`` off CUDA, when the capture fails, or when the replay's output
    differs from the eager one."""
    if not ids.is_cuda:
        raise ProviderUnavailable("CUDA graphs need a CUDA device")
    enc = m.encoder

    def core() -> torch.Tensor:
        with torch.no_grad():
            hidden = enc.embeddings(input_ids=ids)
            return enc.encoder(hidden)[0]

    eager = inference_step(m, ids)()
    graph = torch.cuda.CUDAGraph()
    try:  # a variant whose code cannot run this way (host syncs, hooks) is reported, not fatal
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # caches, path choices and the allocator settle before capture
                core()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            out = core()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001  (the reason goes into the report)
        raise ProviderUnavailable(f"CUDA graph capture failed: {type(exc).__name__}: {exc}"[:300]) from exc
    tol = 1e-2 if out.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if not torch.allclose(out.float(), eager.float(), rtol=tol, atol=tol):
        err = (out.float() - eager.float()).abs().max().item()
        raise ProviderUnavailable(f"the CUDA graph replay differs from eager (max |diff| {err:.3g})")

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def model_case_inputs(case: ModelCase, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded token ids ``[batch, seq]`` and labels ``[batch]`` of every model-level row of ``case``."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 1000, (case.batch, case.seq), generator=gen).to(device)
    labels = torch.randint(0, 2, (case.batch,), generator=gen).to(device)
    return ids, labels


def model_case_params(case: ModelCase, mode: str) -> dict[str, Any]:
    """The parameters a model-level row of ``case`` in ``mode`` is recorded under."""
    c = case
    params = {"kind": "model", "mode": mode, "case": c.id, "layers": c.layers, "d": c.d, "n": c.n}
    params.update(batch=c.batch, seq=c.seq, ffn=c.ffn)
    return params


def run_model_group(
    run: GroupRun,
    case: ModelCase,
    mode: str,
    variants: list[str],
    step: Callable[[str, torch.Tensor, torch.Tensor], StepInfo],
) -> dict[str, dict[str, Any]]:
    """Every variant of ``case`` timed interleaved, recorded under ``mode``: ``step(variant, ids,
    labels)`` builds the variant and returns its timed step and the fields its row adds."""
    ids, labels = model_case_inputs(case, run.device)
    params = model_case_params(case, mode)

    def candidate(variant: str) -> Candidate:
        return info_candidate(variant, lambda: step(variant, ids, labels))

    return run_case_group(run, case, variants, candidate, params=params, cost=case_cost(case, params))


def run_model_case(
    run: GroupRun, case: ModelCase, mode: str, variants: list[str]
) -> dict[str, dict[str, Any]]:
    """Every variant of ``case`` in ``mode`` (infer, infer_graph, train), timed interleaved."""

    def step(variant: str, ids: torch.Tensor, labels: torch.Tensor) -> StepInfo:
        m = build_model(variant, case, run.device)
        info = {"attach": m.attach}
        if mode == "train":
            return train_step(m, ids, labels), info
        if mode == "infer_graph":
            return graph_inference_step(m, ids), info
        if mode != "infer":
            raise ValueError(f"model mode must be infer, infer_graph or train; got {mode!r}")
        return inference_step(m, ids), info

    return run_model_group(run, case, mode, variants, step)
