"""Atomic writes: results and checkpoints are written to a temporary name and renamed into place,
so a killed process never leaves a half-written file or folder behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_csv(path: str | os.PathLike, rows: list[dict], fieldnames: list[str],
                     lineterminator: str = "\r\n") -> None:
    """`rows` as CSV with a header (missing values as empty cells), written in one atomic step."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator=lineterminator)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_save_directory(target: str | os.PathLike, write: Callable[[Path], Any], is_main_process: bool = True) -> None:
    """Fill a fresh temporary folder with `write(tmp_dir)` and rename it to `target`.

    An existing `target` is replaced only after the new folder is complete (it is first moved
    aside, then deleted), so at every moment either the old or the new folder is whole.
    """
    if not is_main_process:
        return
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        write(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_interrupted_saves(folder: str | os.PathLike) -> list[str]:
    """Tidy what a killed `atomic_save_directory` / `atomic_write_bytes` left in `folder` (not
    recursive), returning one line per action:

    * `.NAME.<random>.tmp` (or a checkpoint's `.step_N.tmp`): a half-written file or folder, deleted;
    * `.NAME.old` next to `NAME`: the previous version, already replaced, deleted;
    * `.NAME.old` without `NAME`: the kill fell between moving the old version aside and moving the
      new one in, so the old version is the last complete one; it is renamed back to `NAME`.
    """
    folder = Path(folder)
    actions: list[str] = []
    if not folder.is_dir():
        return actions
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if not name.startswith("."):
            continue
        if name.endswith(".old") and len(name) > len("..old"):
            target = folder / name[1:-len(".old")]
            if target.exists():
                _remove(entry)
                actions.append(f"removed {entry} (superseded by {target.name})")
            else:
                os.replace(entry, target)
                actions.append(f"restored {target} from {entry.name} (a save was interrupted)")
        elif name.endswith(".tmp"):  # .NAME.<random>.tmp, or a checkpoint's .step_N.tmp
            _remove(entry)
            actions.append(f"removed {entry} (half-written)")
    return actions


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
