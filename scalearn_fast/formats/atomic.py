"""Atomic file writes, and clean-up of the temporary files a killed writer leaves behind.

Every write goes to a hidden temporary file in the target's folder, named
``.{target}.{pid}-{random}.tmp``, is flushed and fsynced, then moved over the target with
``os.replace``. A reader sees the old file or the new one, never a mix. A writer killed before
the move leaves its temporary file; ``clean_stale_temps`` removes those whose writer process is
gone (or that are a day old), and ``save_*`` / ``load_*`` call it on the folders they touch.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

STALE_AFTER_S = 24 * 3600  # a temporary file this old is stale whoever wrote it


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_name(path: Path) -> Path:
    """The hidden temporary file a write of ``path`` goes through."""
    return path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_tensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """``tensors`` as one safetensors file (``metadata`` in its header), written atomically."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def _writer_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process: a write in progress on another thread
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False  # alive (another user's process) or unknowable: keep it
    return False


def clean_stale_temps(folder: str | os.PathLike[str], names: Iterable[str]) -> list[Path]:
    """Remove the temporary files of killed writes of ``folder/<name>``; returns what was removed.

    A temporary file is stale when the process that made it no longer runs, or when it is older
    than a day (a writer on another machine sharing the folder). A running writer's file stays.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    removed = []
    patterns = [re.compile(rf"^\.{re.escape(name)}\.(?:(\d+)-)?[^/]+\.tmp$") for name in names]
    now = time.time()
    for entry in root.iterdir():
        for pattern in patterns:
            match = pattern.match(entry.name)
            if match is None:
                continue
            try:
                old = now - entry.stat().st_mtime > STALE_AFTER_S
                if old or (match.group(1) is not None and _writer_gone(int(match.group(1)))):
                    entry.unlink()
                    removed.append(entry)
            except OSError:  # gone meanwhile, or a read-only folder: nothing to do
                pass
            break
    return removed
