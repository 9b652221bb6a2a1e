"""A tiny random BERT (2 layers, d = 16) with three random source adapters per FFN site,
attached as AdapterFusion or ScaLearn on the torch backend: the model-level tests of the eval
path and the patched output site build it from a config (no download)."""

from __future__ import annotations

import torch
import transformers

from scalearn_fast.models import attach_fusion, attach_scalearn, ffn_sites

D, R, SOURCES = 16, 4, ("a", "b", "c")


def tiny_bert_with(kind: str, *, seed: int = 0, sources: tuple[str, ...] = SOURCES) -> transformers.BertModel:
    """``kind``: ``fusion`` (score dropout 0) or ``scalearn``. In eval mode."""
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        vocab_size=50, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.BertModel(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    srcs = {
        name: {
            site.key: (
                torch.randn(R, D, generator=g) * 0.3,
                torch.randn(R, generator=g) * 0.3,
                torch.randn(D, R, generator=g) * 0.3,
                torch.randn(D, generator=g) * 0.3,
            )  # fmt: skip
            for site in ffn_sites(model)
        }
        for name in sources
    }
    if kind == "fusion":
        attach_fusion(model, srcs, backend="torch", fusion_config={"dropout_prob": 0.0})
    elif kind == "scalearn":
        attach_scalearn(model, srcs, backend="torch")
    else:
        raise ValueError(f"kind must be 'fusion' or 'scalearn'; got {kind!r}")
    return model.eval()
