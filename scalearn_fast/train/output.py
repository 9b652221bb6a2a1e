"""A run's ``--output`` folder: checked before any work, written whole or not at all.

A run writes into a hidden staging folder beside ``--output`` and renames it into place only
when everything is saved. A failed run removes the staging folder and any parent folders it
created, so it leaves nothing behind; the staging folder of a killed run is removed by the next
run into the same ``--output``. An existing non-empty ``--output`` is refused unless
``overwrite`` is set, and even then only a previous run's folder (one with ``results.json``) is
replaced, so that ``--overwrite`` cannot delete an unrelated folder.

In a distributed run only the main process (rank 0) stages and writes the folder; the others
check ``--output`` alike and get its path, which they must not write to (``is_main_process``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .distributed import is_main_process

RESULTS_FILE = "results.json"


def check_output(output_dir: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """What can be said about ``output_dir`` without writing; returns it as an absolute path."""
    out = Path(output_dir).absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {output_dir}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(
                f"--output {output_dir}: the folder exists and is not empty; pass --overwrite to replace "
                "it with this run's output, or choose another folder"
            )
        if not (out / RESULTS_FILE).is_file():
            raise ValueError(
                f"--output {output_dir}: the folder is not empty and has no {RESULTS_FILE}, so it is not a "
                "previous run's output; --overwrite replaces only those. Choose another folder"
            )
    return out


def _make_dirs(folder: Path, option_value: str) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, outermost first."""
    missing = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    created: list[Path] = []
    try:
        for path in reversed(missing):
            path.mkdir()
            created.append(path)
    except OSError as exc:
        _remove_empty(created)
        raise ValueError(
            f"--output {option_value}: cannot create a folder at {exc.filename or path}: "
            f"{exc.strerror or exc}"
        ) from exc
    return created


def _remove_empty(folders: list[Path]) -> None:
    for path in reversed(folders):
        try:
            path.rmdir()
        except OSError:
            pass


@contextmanager
def staged_output(output_dir: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh staging folder; on success it becomes ``output_dir``, on failure it goes.

    The staging folder is created at once (beside ``output_dir``), so a folder that cannot be
    written fails before any training. A process other than the main one gets ``output_dir``'s
    path and nothing is created.
    """
    out = check_output(output_dir, overwrite)
    if not is_main_process():
        yield out
        return
    created = _make_dirs(out.parent, str(output_dir))
    _remove_stale(out)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
    except OSError as exc:
        _remove_empty(created)
        raise ValueError(
            f"--output {output_dir}: cannot create a folder in {out.parent}: {exc.strerror or exc}"
        ) from exc
    try:
        yield staging
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Staging folders of runs into ``out`` whose process is gone (killed before cleaning up)."""
    for path in out.parent.glob(f".{out.name}.partial-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _replace(staging: Path, out: Path) -> None:
    """Move ``staging`` to ``out``; an existing ``out`` (empty, or a checked previous run) goes."""
    if not out.exists():
        staging.rename(out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        staging.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
