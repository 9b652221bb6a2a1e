"""attach_task_bank: a mixed batch equals each task's single-task model run alone.

The reference for every sequence is ``load_scalearn`` of its task's checkpoint on a fresh copy of
the base model (its own head, its own label count), run on that sequence's batch alone.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from scalearn_fast import (  # noqa: E402
    add_task,
    attach_scalearn,
    attach_task_bank,
    detach_task_bank,
    load_scalearn,
    remove_task,
    save_scalearn,
)
from scalearn_fast.models import (  # noqa: E402
    ffn_sites,
    omega_parameters,
    scalearn_layers,
    task_bank_layers,
    task_bank_parameters,
    task_names,
)
from scalearn_fast.models.task_bank import HEADS  # noqa: E402

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    vocab_size=100,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
# one task per variant, with different label counts
TASKS = {
    "rte": ("scalearn", 2),
    "mnli": ("scalearn_uniform", 3),
    "sst": ("scalearn++", 2),
    "stsb": ("scalearn_uniform++", 1),
}


def base(kind: str, num_labels: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cls = {
        "bert": transformers.BertForSequenceClassification,
        "roberta": transformers.RobertaForSequenceClassification,
    }
    cfg = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig}[kind](
        num_labels=num_labels, **TINY
    )
    return cls[kind](cfg).eval()


def sources_for(model, n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    ranks = (4, 2, 5)[:n]
    return {
        f"s{i}": {
            site.key: (
                torch.randn(ranks[i], d, generator=g) * 0.3,
                torch.randn(ranks[i], generator=g) * 0.3,
                torch.randn(d, ranks[i], generator=g) * 0.3,
                torch.randn(d, generator=g) * 0.3,
            )
            for site in ffn_sites(model)
        }
        for i in range(n)
    }


def task_model(kind, trunk, sources, variant, labels, seed):
    """A single-task model: the shared trunk, its own head (random), random ω."""
    model = base(kind, labels, seed=seed)
    model.base_model.load_state_dict(trunk.base_model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(model.base_model_prefix + ".") or ".pooler." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    attach_scalearn(model, sources, variant)
    with torch.no_grad():
        for omega in omega_parameters(model):
            omega.copy_(1 + 0.5 * torch.randn(omega.shape, generator=g))
    return model


@pytest.fixture(scope="module", params=["bert", "roberta"])
def setup(request, tmp_path_factory):
    kind = request.param
    trunk = base(kind)
    sources = sources_for(trunk)
    folders = {}
    for i, (name, (variant, labels)) in enumerate(TASKS.items()):
        folder = tmp_path_factory.mktemp(f"{kind}_{name}")
        save_scalearn(task_model(kind, trunk, sources, variant, labels, seed=10 + i), folder)
        folders[name] = folder
    return kind, trunk, sources, folders


def single(kind, trunk, sources, folder, labels, dtype):
    model = base(kind, labels)
    model.base_model.load_state_dict(trunk.base_model.state_dict())
    load_scalearn(model, folder, sources=sources, backend="torch")
    return model.to(dtype).eval()


def batch(n: int = 7, length: int = 9, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.int64)
    mask[n - 1, 3:] = 0
    mask[0, length - 2 :] = 0
    return ids, mask


MIXED = ["rte", "mnli", "sst", "stsb", "mnli", "rte", "stsb"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mixed_batch_equals_each_single_task_model(setup, dtype):
    kind, trunk, sources, folders = setup
    bank = attach_task_bank(copy.deepcopy(trunk), sources, folders, backend="torch").to(dtype)
    ids, mask = batch()
    with torch.no_grad():
        logits = bank(input_ids=ids, attention_mask=mask, task=MIXED).logits
    assert logits.shape == (7, 3)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for name, (_variant, labels) in TASKS.items():
        rows = [b for b, t in enumerate(MIXED) if t == name]
        ref_model = single(kind, trunk, sources, folders[name], labels, dtype)
        with torch.no_grad():
            ref = ref_model(input_ids=ids[rows], attention_mask=mask[rows]).logits
        torch.testing.assert_close(logits[rows, :labels], ref, **tol)
        assert torch.all(logits[rows, labels:] == float("-inf"))
    # ids instead of names, and the triton backend (interpreter, fp32) give the same
    with torch.no_grad():
        by_id = bank(
            input_ids=ids, attention_mask=mask, task=[task_names(bank).index(t) for t in MIXED]
        ).logits
    torch.testing.assert_close(by_id, logits, rtol=0, atol=0)


def test_mixed_batch_gradients_equal_per_task_gradients(setup):
    """One mixed batch's gradients of every task's ω and head equal those of that task's own
    model on its sequences (so training a bank trains every target as its own run would)."""
    kind, trunk, sources, folders = setup
    dtype = torch.float64
    bank = attach_task_bank(copy.deepcopy(trunk), sources, folders, backend="torch").to(dtype)
    ids, mask = batch()
    labels_of = {name: torch.arange(7) % labels for name, (_v, labels) in TASKS.items()}
    targets = torch.tensor([labels_of[t][b] for b, t in enumerate(MIXED)])
    logits = bank(input_ids=ids, attention_mask=mask, task=MIXED).logits
    F.cross_entropy(logits, targets, reduction="sum").backward()
    layers = task_bank_layers(bank)
    for name, (variant, labels) in TASKS.items():
        rows = [b for b, t in enumerate(MIXED) if t == name]
        ref = single(kind, trunk, sources, folders[name], labels, dtype)
        for p in ref.parameters():
            p.grad = None
        out = ref(input_ids=ids[rows], attention_mask=mask[rows]).logits
        F.cross_entropy(out, targets[rows], reduction="sum").backward()
        # one task per variant group: its row is 0 in its group
        if variant.endswith("++"):
            torch.testing.assert_close(layers[0].group(variant).grad[0], omega_parameters(ref)[0].grad)
        else:
            for layer, ref_layer in zip(layers, scalearn_layers(ref), strict=True):
                torch.testing.assert_close(layer.group(variant).grad[0], ref_layer.omega.grad)
        head = bank.get_submodule(HEADS)[name]
        own = dict(ref.named_parameters())
        for key, p in head.items():
            torch.testing.assert_close(p.grad, own[key.replace("__", ".")].grad)


def test_triton_backend_fp32_interpreter(setup):
    pytest.importorskip("triton")
    kind, trunk, sources, folders = setup
    ids, mask = batch(n=4, length=5)
    task = ["sst", "rte", "mnli", "stsb"]
    out = {}
    for backend in ("torch", "triton"):
        bank = attach_task_bank(copy.deepcopy(trunk), sources, folders, backend=backend)
        with torch.no_grad():
            out[backend] = bank(input_ids=ids, attention_mask=mask, task=task).logits
    torch.testing.assert_close(out["triton"], out["torch"], rtol=1e-4, atol=1e-5)


def test_add_and_remove_task_at_run_time(setup):
    kind, trunk, sources, folders = setup
    first = {k: folders[k] for k in ("rte", "sst")}
    bank = attach_task_bank(copy.deepcopy(trunk), sources, first, backend="torch")
    ids, mask = batch(n=3)
    with torch.no_grad():
        before = bank(input_ids=ids, attention_mask=mask, task=["rte", "sst", "rte"]).logits
    add_task(bank, "mnli", folders["mnli"])
    assert task_names(bank) == ["rte", "sst", "mnli"]
    with torch.no_grad():
        after = bank(input_ids=ids, attention_mask=mask, task=["rte", "sst", "mnli"]).logits
        ref = single(kind, trunk, sources, folders["mnli"], 3, torch.float32)
        expect = ref(input_ids=ids[2:], attention_mask=mask[2:]).logits
    torch.testing.assert_close(after[:2, :2], before[:2])
    torch.testing.assert_close(after[2], expect[0], rtol=1e-4, atol=1e-5)
    remove_task(bank, "rte")
    with torch.no_grad():
        again = bank(input_ids=ids, attention_mask=mask, task=["sst", "sst", "mnli"]).logits
    torch.testing.assert_close(again[1, :2], before[1])
    torch.testing.assert_close(again[2], after[2])
    with pytest.raises(ValueError, match=r"task\[0\] is 'rte', not a task of the bank"):
        bank(input_ids=ids, attention_mask=mask, task=["rte", "sst", "mnli"])


def test_detach_restores_the_model(setup):
    kind, trunk, sources, folders = setup
    model = copy.deepcopy(trunk)
    ids, mask = batch(n=2)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    attach_task_bank(model, sources, folders, backend="torch")
    assert all(p.requires_grad for p in task_bank_parameters(model))
    assert not any(
        p.requires_grad for n, p in model.named_parameters() if HEADS not in n and "omega" not in n
    )
    detach_task_bank(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, plain, rtol=0, atol=0)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_bad_inputs_give_clear_errors(setup, tmp_path):
    kind, trunk, sources, folders = setup
    ids, mask = batch(n=2)
    bank = attach_task_bank(copy.deepcopy(trunk), sources, folders, backend="torch")
    with pytest.raises(ValueError, match=r"task id 9 is out of range: the bank holds 4 tasks"):
        bank(input_ids=ids, attention_mask=mask, task=[0, 9])
    with pytest.raises(ValueError, match="task names 3 tasks for a batch of 2 sequences"):
        bank(input_ids=ids, attention_mask=mask, task=["rte"] * 3)
    with pytest.raises(ValueError, match="pass task="):
        bank(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="takes no labels="):
        bank(input_ids=ids, attention_mask=mask, task=["rte"] * 2, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="already in the bank"):
        add_task(bank, "rte", folders["rte"])
    # a task trained over other sources (wrong N)
    two = dict(list(sources.items())[:2])
    folder = tmp_path / "two"
    save_scalearn(task_model(kind, trunk, two, "scalearn", 2, seed=5), folder)
    with pytest.raises(
        ValueError, match=r"task 'two' .*trained over N=2 sources \['s0', 's1'\], the bank holds N=3"
    ):
        add_task(bank, "two", folder)
    # a task whose model has another hidden size (wrong d)
    other = transformers.BertConfig(**{**TINY, "hidden_size": 16}) if kind == "bert" else None
    if other is not None:
        small = transformers.BertForSequenceClassification(other)
        folder = tmp_path / "small"
        save_scalearn(attach_scalearn(small, sources_for(small), "scalearn"), folder)
        with pytest.raises(ValueError, match=r"hidden size d=16, the model has d=32"):
            add_task(bank, "small", folder)
    # a task saved without its head
    folder = tmp_path / "headless"
    save_scalearn(task_model(kind, trunk, sources, "scalearn", 2, seed=6), folder, include_head=False)
    with pytest.raises(ValueError, match="holds no task head"):
        add_task(bank, "headless", folder)
    with pytest.raises(ValueError, match=r"unknown task 'nope'"):
        remove_task(bank, "nope")
    assert task_names(bank) == list(TASKS)  # the failed adds changed nothing
    with pytest.raises(ValueError, match="tasks must map task names"):
        attach_task_bank(copy.deepcopy(trunk), sources, {})


def test_training_drops_out_each_tasks_omega_with_its_own_rate(setup):
    """In training each task's ω is dropped out with its checkpoint's rate (0.3 by default,
    0 for scalearn_uniform++): rows of a p = 0 task do not change between calls, others do."""
    kind, trunk, sources, folders = setup
    bank = attach_task_bank(copy.deepcopy(trunk), sources, folders, backend="torch").train()
    ids, mask = batch()
    with torch.no_grad():
        first, second = (bank(input_ids=ids, attention_mask=mask, task=MIXED).logits for _ in range(2))
        evaluated = bank.eval()(input_ids=ids, attention_mask=mask, task=MIXED).logits
    rows = {name: [b for b, t in enumerate(MIXED) if t == name] for name in TASKS}
    torch.testing.assert_close(first[rows["stsb"]], second[rows["stsb"]], rtol=0, atol=0)
    torch.testing.assert_close(first[rows["stsb"]], evaluated[rows["stsb"]], rtol=0, atol=0)
    for name in ("rte", "mnli", "sst"):
        assert not torch.equal(first[rows[name]], second[rows[name]]), name


def _other_model(kind: str, num_labels: int):
    torch.manual_seed(0)
    if kind == "deberta-v2":
        cfg = transformers.DebertaV2Config(num_labels=num_labels, **TINY)
        return transformers.DebertaV2ForSequenceClassification(cfg).eval()
    cfg = transformers.BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=37, decoder_ffn_dim=37, vocab_size=100, max_position_embeddings=64,
        num_labels=num_labels, dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    return transformers.BartForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("kind", ["deberta-v2", "bart"])
def test_other_heads_and_encoder_decoder(kind, tmp_path):
    """DeBERTa-v2 (a pooler inside the head) and BART (decoder sites, an eos-pooled head): each
    sequence of a mixed batch equals its task's single-task model."""
    trunk = _other_model(kind, 2)
    srcs = sources_for(trunk)
    folders, labels = {}, {"a": 2, "b": 3}
    for i, (name, n_labels) in enumerate(labels.items()):
        model = _other_model(kind, n_labels)
        model.base_model.load_state_dict(trunk.base_model.state_dict())
        g = torch.Generator().manual_seed(20 + i)
        attach_scalearn(model, srcs, "scalearn" if i == 0 else "scalearn_uniform++")
        with torch.no_grad():
            for _, p in model.named_parameters():
                if p.requires_grad:  # ω and the head
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        folders[name] = save_scalearn(model, tmp_path / name)
    bank = attach_task_bank(copy.deepcopy(trunk), srcs, folders, backend="torch")
    ids, mask = batch(n=4, length=8)
    ids[:, -1] = trunk.config.eos_token_id if kind == "bart" else ids[:, -1]
    mask[:] = 1
    task = ["a", "b", "b", "a"]
    with torch.no_grad():
        logits = bank(input_ids=ids, attention_mask=mask, task=task).logits
    for name, n_labels in labels.items():
        rows = [b for b, t in enumerate(task) if t == name]
        ref = _other_model(kind, n_labels)
        ref.base_model.load_state_dict(trunk.base_model.state_dict())
        load_scalearn(ref, folders[name], sources=srcs, backend="torch")
        with torch.no_grad():
            expect = ref.eval()(input_ids=ids[rows], attention_mask=mask[rows]).logits
        torch.testing.assert_close(logits[rows, :n_labels], expect, rtol=1e-4, atol=1e-5)
