"""The training CLI as a user meets it: help with defaults, clear errors naming the option for
impossible values, output folders that are written whole or not at all, log lines that do not
collide with the progress bar. Runs use a tiny random BERT saved with a small word-piece vocab."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", reason="the training CLI needs transformers")

from tiny_bert_folder import save_tiny_bert  # noqa: E402

from scalearn_fast import cli  # noqa: E402
from scalearn_fast.train.output import staged_output  # noqa: E402

TRAIN_COMMANDS = ("train-adapter", "train-scalearn")
TINY_RUN = ["--max-steps", "2", "--max-train-samples", "16", "--max-eval-samples", "8", "--max-length", "32",
            "--batch-size", "8", "--no-progress", "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer BERT (d=32) with the MiniLM's tokenizer files, saved as a local HF folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    save_tiny_bert(folder)
    return folder


def _subparsers() -> dict[str, object]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    return dict(action.choices)


# --------------------------------------------------------------------------------------------
# help


def test_every_option_has_help_and_shows_its_default():
    for name, sub in _subparsers().items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
            if action.default is not None and action.default is not False and not action.required:
                assert f"(default: {action.default})" in text, (name, action.dest)
    helps = {name: " ".join(sub.format_help().split()) for name, sub in _subparsers().items()}
    assert "--lr LR peak learning rate (AdamW) (default: 0.0003)" in helps["train-adapter"]
    assert "--lr LR peak learning rate (AdamW) (default: 0.006)" in helps["train-scalearn"]
    assert "(default: 16)" in helps["train-adapter"] and "--overwrite" in helps["train-scalearn"]


# --------------------------------------------------------------------------------------------
# impossible values: refused at parse time, naming the option


@pytest.mark.parametrize(
    "command, option, value, message",
    [
        ("train-adapter", "--lr", "inf", "must be a finite number; got 'inf'"),
        ("train-scalearn", "--lr", "nan", "must be a finite number; got 'nan'"),
        ("train-adapter", "--epochs", "inf", "must be a finite number; got 'inf'"),
        ("train-adapter", "--warmup-ratio", "nan", "must be a finite number"),
        ("train-scalearn", "--omega-dropout", "inf", "must be a finite number"),
        ("train-adapter", "--reduction-factor", "0", "must be a finite number > 0; got '0'"),
        ("train-adapter", "--reduction-factor", "-4", "must be a finite number > 0; got '-4'"),
        ("train-adapter", "--reduction-factor", "nan", "must be a finite number > 0; got 'nan'"),
        ("train-adapter", "--lr", "fast", "not a number: 'fast'"),
    ],
)
def test_impossible_numbers_name_the_option(tmp_path, capsys, command, option, value, message):
    args = [command, "--task", "rte", "--output", str(tmp_path / "o"), option, value]
    if command == "train-scalearn":
        args += ["--sources", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {message}" in err
    assert not (tmp_path / "o").exists()


def test_python_api_refuses_the_same_values(tiny_model, tmp_path):
    from scalearn_fast.train.adapter import bottleneck_size
    from scalearn_fast.train.loop import TrainConfig
    from scalearn_fast.train.stages import train_adapter

    for bad in (0, -4, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="reduction_factor .*must be a finite number > 0"):
            bottleneck_size(384, bad)
    assert bottleneck_size(384, 16) == 24 and bottleneck_size(384, 384) == 1
    with pytest.raises(ValueError, match="leaves no bottleneck for hidden size 32"):
        train_adapter("rte", tmp_path / "o", model_dir=str(tiny_model), reduction_factor=64)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="lr must be a finite number; got inf"):
        TrainConfig(task="rte", lr=float("inf"))
    with pytest.raises(ValueError, match="epochs must be a finite number; got inf"):
        TrainConfig(task="rte", lr=1e-3, epochs=float("inf"))


# --------------------------------------------------------------------------------------------
# output folders


def test_output_that_cannot_be_created_names_the_option(capsys):
    code = cli.main(["train-adapter", "--task", "rte", "--output", "/proc/foo", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--output /proc/foo: cannot create a folder" in err, err


def test_unsupported_model_type_is_named_before_the_tokenizer(tmp_path, capsys):
    """A GPT-2 folder with no tokenizer files: the model type is what the user hears about."""
    transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "runs" / "o"
    code = cli.main(
        ["train-adapter", "--task", "rte", "--model", str(tmp_path / "gpt2"), "--output", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "model_type 'gpt2' is not supported; supported: ['bart', 'bert'" in err, err
    assert not (tmp_path / "runs").exists()


def test_failed_run_leaves_no_output_folder(tiny_model, tmp_path, capsys):
    """The data folder lacks the task: the run fails after the output checks, and the output
    folder (and the parents it created) are gone; the message names the ways to get data."""
    (tmp_path / "empty").mkdir()
    out = tmp_path / "a" / "b" / "o"
    code = cli.main(["train-adapter", "--task", "rte", "--model", str(tiny_model), "--output", str(out),
                     "--glue-dir", str(tmp_path / "empty"), *TINY_RUN])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "RTE/train.tsv not found" in err
    assert "--glue-dir" in err and "--data hub" in err and "datasets" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_default_data_is_the_shipped_sample_and_names_the_routes_for_other_tasks(
    tiny_model, tmp_path, capsys
):
    code = cli.main(["train-adapter", "--task", "qqp", "--model", str(tiny_model), "--output",
                     str(tmp_path / "o"), *TINY_RUN])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "the GLUE sample shipped with the package lacks this task" in err
    assert "--glue-dir" in err and "--data hub" in err and "SCALEARN_FAST_GLUE_DIR" in err
    assert not (tmp_path / "o").exists()


def test_existing_output_is_refused_without_overwrite(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SCALEARN_FAST_GLUE_DIR", raising=False)
    out = tmp_path / "o"
    args = ["train-adapter", "--task", "rte", "--model", str(tiny_model), "--output", str(out), *TINY_RUN]
    assert cli.main(args) == 0
    first = (out / "results.json").read_text()
    assert '"data": "the GLUE sample shipped with scalearn_fast' in first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no staging folder left
    capsys.readouterr()

    assert cli.main(args) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "results.json").read_text() == first

    (out / "stale.txt").write_text("from an earlier run")
    assert cli.main([*args, "--overwrite", "--seed", "7"]) == 0
    assert not (out / "stale.txt").exists()  # replaced as a whole
    assert '"seed": 7' in (out / "results.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]

    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    capsys.readouterr()
    code = cli.main(["train-adapter", "--task", "rte", "--output", str(other), "--overwrite", *TINY_RUN])
    assert code == 2 and "not a previous run's output" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me"


def test_staged_output_moves_into_place_or_cleans_up(tmp_path):
    with pytest.raises(RuntimeError):
        with staged_output(tmp_path / "x" / "y") as staging:
            (staging / "f").write_text("partial")
            raise RuntimeError("training failed")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty").mkdir()
    with staged_output(tmp_path / "empty") as staging:
        (staging / "f").write_text("done")
    assert (tmp_path / "empty" / "f").read_text() == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    stale = tmp_path / ".new.partial-999999999"  # a killed run's staging folder (no such pid)
    stale.mkdir()
    with staged_output(tmp_path / "new"):
        pass
    assert not stale.exists() and (tmp_path / "new").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="--output .*file: exists and is not a folder"):
        with staged_output(tmp_path / "file"):
            pass


# --------------------------------------------------------------------------------------------
# logging


def test_log_lines_go_through_tqdm_write_with_rounded_metrics(tiny_model, tmp_path, monkeypatch):
    from tqdm.auto import tqdm

    from scalearn_fast.train.stages import train_adapter

    lines: list[str] = []
    monkeypatch.setattr(tqdm, "write", classmethod(lambda cls, s, *a, **k: lines.append(s)))
    train_adapter("rte", tmp_path / "o", model_dir=str(tiny_model), max_steps=2, eval_every=1,
                  max_train_samples=16, max_eval_samples=8, max_length=32, batch_size=8,
                  device="cpu", progress=True)  # fmt: skip
    steps = [line for line in lines if " step " in line]
    assert len(steps) == 2, lines
    assert re.fullmatch(r"\[rte\] step 1/2 loss \d+\.\d{4} dev accuracy \d\.\d{4} main \d\.\d{4}", steps[0])
    assert any("data: the GLUE sample shipped with scalearn_fast" in line for line in lines)
