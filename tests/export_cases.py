"""The packages the export tests share, made once per test process (an AOTInductor compile and
the CMake build take minutes): a tiny BERT with ScaLearn attached (exported through the
``scalearn-fast export`` command from saved folders) and one with AdapterFusion (through
``scalearn_fast.export``), plus the native build of ``scalearn-run``."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
# build/ is ignored; one folder per torch install (a CMake cache remembers its libtorch), kept
# between runs so that a rebuild is incremental
_TORCH_TAG = hashlib.sha1(torch.utils.cmake_prefix_path.encode()).hexdigest()[:8]
BUILD = ROOT / "build" / f"native-tests-{torch.__version__.replace('+', '-')}-{_TORCH_TAG}"
SHAPES = ((1, 5), (3, 17))  # (batch, seq): two of each, neither the traced example's (2, 9)

_made: dict[str, object] = {}


@dataclass
class Case:
    model: nn.Module  # the eager reference, eval mode
    package: Path


def tiny_bert(seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=100,
        max_position_embeddings=64,
    )
    return transformers.BertForSequenceClassification(config).eval()


def random_sources(model: nn.Module, n: int = 3, r: int = 4, seed: int = 1) -> dict:
    from scalearn_fast.models import ffn_sites

    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    return {
        f"s{i}": {
            site.key: (
                torch.randn(r, d, generator=g) * 0.3,
                torch.randn(r, generator=g) * 0.3,
                torch.randn(d, r, generator=g) * 0.3,
                torch.randn(d, generator=g) * 0.3,
            )
            for site in ffn_sites(model)
        }
        for i in range(n)
    }


def randomize(params: list[nn.Parameter], scale: float, seed: int = 3) -> None:
    """Non-trivial trained-looking values (ω far from 2/N, fusion scores far from uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def inputs(batch: int, seq: int, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and an attention mask whose first row ends in two padding tokens."""
    g = torch.Generator().manual_seed(seed + 100 * batch + seq)
    ids = torch.randint(3, 100, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, max(seq - 2, 1) :] = 0
    return ids, mask


def scalearn_model(variant: str = "scalearn") -> nn.Module:
    from scalearn_fast import attach_scalearn
    from scalearn_fast.models import omega_parameters

    model = tiny_bert()
    attach_scalearn(model, random_sources(model), variant)
    randomize(omega_parameters(model), 0.7)
    return model.eval()


def fusion_model() -> nn.Module:
    from scalearn_fast import attach_fusion
    from scalearn_fast.models.fusion import fusion_layers

    model = tiny_bert()
    attach_fusion(model, random_sources(model))
    randomize([p for layer in fusion_layers(model) for p in layer.fusion_parameters()], 0.3)
    return model.eval()


def scalearn_case(tmp: Path) -> Case:
    """ScaLearn, saved (model folder + save_scalearn with its sources) and exported by the CLI."""
    if "scalearn" not in _made:
        from scalearn_fast import save_scalearn
        from scalearn_fast.cli import main

        model = scalearn_model()
        model.save_pretrained(tmp / "model")
        save_scalearn(model, tmp / "scalearn", include_sources=True)
        package = tmp / "scalearn.pt2"
        argv = ["export", "--model", str(tmp / "model"), "--scalearn", str(tmp / "scalearn")]
        assert main([*argv, "--output", str(package), "--seq-len", "9"]) == 0
        _made["scalearn"] = Case(model, package)
    return _made["scalearn"]  # type: ignore[return-value]


def fusion_case(tmp: Path) -> Case:
    """AdapterFusion, exported by ``scalearn_fast.export``."""
    if "fusion" not in _made:
        from scalearn_fast import export

        model = fusion_model()
        ids, mask = inputs(2, 9)
        package = export(model, {"input_ids": ids, "attention_mask": mask}, tmp / "fusion.pt2")
        _made["fusion"] = Case(model, package)
    return _made["fusion"]  # type: ignore[return-value]


def eager_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def cmake() -> str | None:
    """The cmake on PATH, else the one of the ``cmake`` Python package, else None."""
    found = shutil.which("cmake")
    if found is None:
        try:
            import cmake as cmake_package  # type: ignore[import-not-found]

            found = str(Path(cmake_package.CMAKE_BIN_DIR) / "cmake")
        except ImportError:
            return None
    return found


def native_build() -> Path:
    """Configure and build CMakeLists.txt against this torch (once per process); the build dir."""
    if "native" not in _made:
        exe = cmake()
        assert exe is not None
        configure = [
            exe,
            "-S",
            str(ROOT),
            "-B",
            str(BUILD),
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        ]
        if shutil.which("ninja") and not (BUILD / "CMakeCache.txt").exists():
            configure += ["-G", "Ninja"]
        env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        for cmd in (configure, [exe, "--build", str(BUILD)]):
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.stderr.write(done.stdout + done.stderr)
                raise AssertionError(f"{' '.join(cmd)} failed (exit {done.returncode}); output above")
        _made["native"] = BUILD
    return _made["native"]  # type: ignore[return-value]
