"""add_task / remove_task on a compiled task-bank model: no recompile, and the new task's logits
equal its single-task model's. The task ids, the bank and the per-task heads run outside the
compiled graphs, so nothing a graph was specialised on changes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo

pytest.importorskip("transformers", reason="transformers is not installed")

import test_task_bank_model as shared  # noqa: E402  (tests/ is on sys.path under pytest)

from scalearn_fast import add_task, attach_task_bank, remove_task, save_scalearn  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    kind = "bert"
    trunk = shared.base(kind)
    sources = shared.sources_for(trunk)
    folders = {}
    for i, (name, (variant, labels)) in enumerate(shared.TASKS.items()):
        if name in ("rte", "mnli", "sst"):
            model = shared.task_model(kind, trunk, sources, variant, labels, seed=10 + i)
            folders[name] = save_scalearn(model, tmp_path_factory.mktemp(name))
    return kind, trunk, sources, folders


def test_add_and_remove_task_after_compile_trigger_no_recompile(setup):
    from torch._dynamo.utils import counters

    kind, trunk, sources, folders = setup
    bank = attach_task_bank(
        copy.deepcopy(trunk), sources, {k: folders[k] for k in ("rte", "mnli")}, backend="torch"
    )
    compiled = torch.compile(bank, backend="eager")
    ids, mask = shared.batch(n=3)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        compiled(input_ids=ids, attention_mask=mask, task=["rte", "mnli", "rte"])
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0  # the encoder did compile
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled(input_ids=ids, attention_mask=mask, task=["mnli", "mnli", "rte"])  # other tasks
            add_task(bank, "sst", folders["sst"])
            after = compiled(input_ids=ids, attention_mask=mask, task=["rte", "mnli", "sst"]).logits
            remove_task(bank, "rte")
            again = compiled(input_ids=ids, attention_mask=mask, task=["sst", "mnli", "sst"]).logits
        ref = shared.single(kind, trunk, sources, folders["sst"], 2, torch.float32)
        expect = ref(input_ids=ids, attention_mask=mask).logits
        mnli = shared.single(kind, trunk, sources, folders["mnli"], 3, torch.float32)
        expect_mnli = mnli(input_ids=ids, attention_mask=mask).logits
    assert counters["stats"]["unique_graphs"] == graphs  # nothing new was compiled
    torch.testing.assert_close(after[2, :2], expect[2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after[1], expect_mnli[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again[[0, 2], :2], expect[[0, 2]], rtol=1e-4, atol=1e-5)
    assert torch.isneginf(after[2, 2])  # sst has 2 labels: padded to the bank's widest head
