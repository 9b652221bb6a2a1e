"""How the package sits among others: import without optional dependencies, no name clashes."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def test_kernels_package_imports_without_triton():
    """From a source tree kernels/ is the top-level ``kernels`` (Hugging Face's kernel-hub name,
    which transformers 5.x imports to probe). Without Triton that import must succeed, carry no
    ``__version__`` (transformers then reads "unavailable"), and fail only when a kernel is used."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import kernels\n"
        f"assert kernels.__file__ == {str(ROOT / 'kernels' / '__init__.py')!r}, kernels.__file__\n"
        "assert getattr(kernels, '__version__', 'N/A') == 'N/A'\n"
        "assert 'fused_forward' in dir(kernels)\n"
        "try:\n"
        "    kernels.fused_forward\n"
        "except ImportError as e:\n"
        "    print('needs', e.name)\n"
        "try:\n"
        "    kernels.no_such_kernel\n"
        "except AttributeError as e:\n"
        "    print('attr', e)\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert "needs triton" in proc.stdout
    assert "attr module 'kernels' has no attribute 'no_such_kernel'" in proc.stdout


def test_scalearn_fast_imports_and_runs_torch_backend_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, scalearn_fast\n"
        "from scalearn_fast.ops.backends import triton_available\n"
        "assert not triton_available()\n"
        "z = torch.randn(3, 8)\n"
        "w_down, b_down = torch.randn(2, 4, 8), torch.zeros(2, 4)\n"
        "w_up, b_up = torch.randn(2, 8, 4), torch.zeros(2, 8)\n"
        "out = scalearn_fast.scaled_adapter_sum(z, w_down, b_down, w_up, b_up, torch.ones(2, 1))\n"
        "ref = scalearn_fast.scaled_adapter_sum(z, w_down, b_down, w_up, b_up, torch.ones(2, 1),\n"
        "                                       backend='reference')\n"
        "torch.testing.assert_close(out, ref)\n"
        "print('ok')\n"
    )
    proc = _run(code)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr
