"""scalearn_fast.export: AOTInductor packages of models with compositions attached, run through
``aoti_load_package``, against the eager model (fp32), at batch sizes and lengths other than the
traced example's; the refusals at export time. The packages are compiled once per test process
(tests/export_cases.py); tests/test_export_native.py runs the same ones through ``scalearn-run``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")

import export_cases as cases  # noqa: E402

from scalearn_fast import attach_scalearn, export  # noqa: E402
from scalearn_fast.cli import main  # noqa: E402
from scalearn_fast.deploy import METADATA_PREFIX, export_program  # noqa: E402
from scalearn_fast.layers import init_omega  # noqa: E402
from scalearn_fast.models import scalearn_layers  # noqa: E402


@pytest.fixture(scope="session")
def packages(tmp_path_factory) -> dict[str, cases.Case]:
    tmp = tmp_path_factory.mktemp("export")
    return {"scalearn": cases.scalearn_case(tmp), "fusion": cases.fusion_case(tmp)}


@pytest.fixture(scope="session")
def loaded(packages) -> dict:
    from torch._inductor import aoti_load_package

    return {name: aoti_load_package(str(case.package)) for name, case in packages.items()}


@pytest.mark.parametrize("kind", ["scalearn", "fusion"])
@pytest.mark.parametrize("batch,seq", cases.SHAPES)
def test_package_matches_eager(packages, loaded, kind, batch, seq):
    ids, mask = cases.inputs(batch, seq)
    (logits,) = loaded[kind](ids, mask)
    torch.testing.assert_close(
        logits, cases.eager_logits(packages[kind].model, ids, mask), rtol=1e-5, atol=1e-5
    )


def test_package_holds_folded_weights_and_names_its_io(loaded):
    scalearn = loaded["scalearn"].get_constant_fqns()
    assert any(name.endswith("scalearn.scaled_up") for name in scalearn)
    assert not [name for name in scalearn if name.endswith(("omega", "scalearn.w_up"))]
    fusion = loaded["fusion"].get_constant_fqns()
    assert any(name.endswith("adapter_fusion.value") for name in fusion)
    assert not [name for name in fusion if "adapter_fusion.query" in name or "adapter_fusion.key" in name]
    meta = loaded["fusion"].get_metadata()
    assert meta[METADATA_PREFIX + "inputs"] == "input_ids,attention_mask"
    assert meta[METADATA_PREFIX + "outputs"] == "logits"
    assert loaded["scalearn"].get_metadata()[METADATA_PREFIX + "compositions"] == "scalearn"


def _program_matches_eager(model) -> None:
    """``export_program`` (torch.export, no compile) against eager at two shapes."""
    ids, mask = cases.inputs(2, 9)
    program, _ = export_program(model, {"input_ids": ids, "attention_mask": mask})
    for batch, seq in cases.SHAPES:
        ids, mask = cases.inputs(batch, seq)
        with torch.no_grad():
            (got,) = program.module()(ids, mask)
        torch.testing.assert_close(got, cases.eager_logits(model, ids, mask), rtol=1e-5, atol=1e-5)


def test_more_compositions_export():
    """A ++ variant, a sequence top-k router and AdapterFusion with residual_before and a query
    before the LayerNorm (a separate score GEMM), at the torch.export level."""
    from scalearn_fast import attach_fusion, attach_router
    from scalearn_fast.layers_router import RouterLayer
    from scalearn_fast.models.fusion import fusion_layers

    _program_matches_eager(cases.scalearn_model("scalearn_uniform++"))
    model = cases.tiny_bert()
    attach_router(model, cases.random_sources(model), gate="topk", k=2, granularity="sequence")
    cases.randomize([m.router.weight for m in model.modules() if isinstance(m, RouterLayer)], 1.0)
    _program_matches_eager(model.eval())
    model = cases.tiny_bert()
    attach_fusion(
        model, cases.random_sources(model), fusion_config={"residual_before": True, "query_before_ln": True}
    )
    cases.randomize([p for layer in fusion_layers(model) for p in layer.fusion_parameters()], 0.3)
    _program_matches_eager(model.eval())


def test_export_leaves_the_model_as_it_was():
    model = cases.scalearn_model()
    layers = scalearn_layers(model)
    ids, mask = cases.inputs(2, 9)
    before = cases.eager_logits(model, ids, mask)
    export_program(model, {"input_ids": ids, "attention_mask": mask})
    assert scalearn_layers(model) == layers
    torch.testing.assert_close(cases.eager_logits(model, ids, mask), before, rtol=0, atol=0)


def test_refusals_at_export_time(tmp_path):
    ids, mask = cases.inputs(2, 9)
    example = {"input_ids": ids, "attention_mask": mask}
    model = cases.scalearn_model()
    with pytest.raises(ValueError, match=r"\.pt2"):
        export(model, example, tmp_path / "model.onnx")
    with pytest.raises(ValueError, match="share their \\[batch, seq\\]"):
        export(model, {"input_ids": ids, "attention_mask": mask[:1]}, tmp_path / "m.pt2")
    with pytest.raises(ValueError, match="dynamic_batch=True needs example_inputs of size >= 2"):
        export(model, {"input_ids": ids[:1], "attention_mask": mask[:1]}, tmp_path / "m.pt2")
    with pytest.raises(ValueError, match="expected \\[batch, seq"):
        export(model, ids[0], tmp_path / "m.pt2")
    with pytest.raises(ValueError, match="eval mode.*model.eval"):
        export(model.train(), example, tmp_path / "m.pt2")
    # a ++ variant whose layers no longer share their one ω (per-layer copies after loading)
    shared = cases.tiny_bert()
    attach_scalearn(shared, cases.random_sources(shared), "scalearn++")
    scalearn_layers(shared)[1].omega = init_omega(3, 32, "scalearn++")
    with pytest.raises(ValueError, match="shares one omega across layers"):
        export(shared, example, tmp_path / "m.pt2")
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_task_bank_has_no_export_path(tmp_path):
    from scalearn_fast.layers_bank import TaskBankLayer, TaskRows

    srcs = cases.random_sources(cases.tiny_bert(), n=2)
    ws = [next(iter(s.values())) for s in srcs.values()]
    bank = TaskBankLayer(
        *([w[j] for w in ws] for j in range(4)),
        groups={"scalearn": torch.nn.Parameter(torch.ones(1, 2, 32))},
        task_rows=TaskRows(),
    )
    model = torch.nn.Sequential(bank).eval()
    with pytest.raises(ValueError, match="TaskBankLayer, which has no export path"):
        export(model, torch.zeros(2, 3, 32), tmp_path / "m.pt2")


def test_documented_export_commands_parse():
    import re
    import shlex

    from scalearn_fast.cli import build_parser

    text = "".join((cases.ROOT / doc).read_text() for doc in ("README.md", "docs/deploy.md"))
    lines = re.findall(r"^scalearn-fast (export .*)$", text.replace("\\\n", " "), flags=re.M)  # joined
    assert len(lines) >= 3
    for line in lines:
        build_parser().parse_args(shlex.split(line))


def test_cli_errors(tmp_path, capsys):
    out = str(tmp_path / "m.pt2")
    assert main(["export", "--model", str(tmp_path / "nope"), "--scalearn", "x", "--output", out]) == 2
    assert "no such folder" in capsys.readouterr().err
    tmp_path.joinpath("model").mkdir()
    argv = ["export", "--model", str(tmp_path / "model"), "--fusion", "f", "--output", out]
    assert main(argv) == 2
    assert "--fusion needs --sources" in capsys.readouterr().err
