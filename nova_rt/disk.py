"""A full disk as a user meets it: one line naming the directory, the bytes needed and the bytes free, exit 2.

`disk_writes(directory, what, ...)` wraps a writer of run outputs. A write that fails for lack of space inside it
(OSError ENOSPC or EDQUOT; safetensors' "No space left on device (os error 28)"; torch.save's RuntimeError from
inline_container.cc, which names no cause and counts as one when the directory is left with less free space than the
write needed) removes that write's temporary files and becomes a DiskFullError (nova_rt.errors). Its users: the
checkpoints of both backends (nova_rt.checkpoint, nova_rt.parallel.checkpoint), the final model
(nova_rt.trainer.save_hf_atomic, nova_rt.backends.megatron.save_megatron_final), and nova_rt.train around a whole stage
for every other output (metrics.jsonl, reports, eval files), naming the directory of the file that failed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from nova_rt.errors import DiskFullError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NAMED = ("no space left", "disk quota exceeded", "os error 28", "os error 122", "storagefull", "quotaexceeded")
_WRITE_FAILED = ("inline_container", "file write failed", "iostream error", "pytorchstreamwriter")
_UNNAMED_MARGIN = 1 << 20  # an unnamed write failure counts as a full disk below this much free space


def state_nbytes(obj) -> int:
    """Bytes of the tensors in a (nested) state dict: what writing it needs, give or take the headers."""
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


def free_bytes(directory: str | Path) -> int:
    """Free bytes for an unprivileged writer on the filesystem of `directory` (or of its nearest existing parent)."""
    path = Path(directory).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen and len(seen) < 8:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def disk_full_reason(exc: BaseException, directory: str | Path, needed: int | None = None) -> str | None:
    """"No space left on device" / "Disk quota exceeded" when `exc` (or what it wraps) is a write that failed for lack
    of space in `directory`, else None."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return os.strerror(e.errno)
        text = str(e).lower()
        if any(s in text for s in _NAMED):
            return os.strerror(errno.EDQUOT if "quota" in text or "os error 122" in text else errno.ENOSPC)
    if any(isinstance(e, RuntimeError) and any(s in str(e).lower() for s in _WRITE_FAILED) for e in _chain(exc)):
        if free_bytes(directory) < max(needed or 0, _UNNAMED_MARGIN):
            return os.strerror(errno.ENOSPC)
    return None


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n:,} bytes ({n / scale:.1f} {unit})"
    return f"{n:,} bytes"


def remove(paths: Iterable[str | Path]) -> None:
    """Delete files and directories, ignoring those already gone."""
    for p in map(Path, paths):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def resume_hint(checkpoints: list[tuple[int, Path]], final_step: int | None = None) -> str:
    """What a rerun does after a write failed, given the complete checkpoints (step, dir), oldest first; final_step:
    the step of the final model being written (a checkpoint of it: the rerun only writes the model)."""
    if not checkpoints:
        return "free space, then rerun (no checkpoint yet: the rerun starts again from step 0)"
    step, path = checkpoints[-1]
    if step == final_step:
        return f"{path.name} is complete: free space, then rerun to write the model without training again"
    return f"free space, then rerun to resume from {path.name} (step {step}), which is intact"


def _value(v):
    return v() if callable(v) else v


@contextlib.contextmanager
def disk_writes(directory: str | Path, what: str, *, needed: int | Callable[[], int] | None = None,
                cleanup: Iterable[str | Path] | Callable[[], Iterable] = (), then: str | Callable[[], str] = "",
                name_failed_file: bool = False):
    """Run a write of `what` into `directory`; a failure for lack of space removes `cleanup` (the write's temporary
    files) and raises a DiskFullError: "DIR: No space left on device writing WHAT: needs about N bytes, M bytes
    free; THEN". `needed` (or a callable giving it) is the size of what was written; `then` says what a rerun does.
    name_failed_file: name the directory of the file the OSError names, when it names one (catch-all writers)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        need = _value(needed)
        reason = disk_full_reason(exc, directory, need)
        if reason is None:
            raise
        remove(_value(cleanup))
        where = Path(directory)
        if name_failed_file:
            failed = next((e.filename for e in _chain(exc) if isinstance(e, OSError) and e.filename), None)
            where = Path(failed).absolute().parent if failed else where
        free = free_bytes(where)
        space = f"needs about {_size(need)}, {_size(free)} free" if need else f"needs more than the {_size(free)} free"
        hint = _value(then) or "free space, then rerun: it resumes from the newest complete checkpoint, if any"
        raise DiskFullError(f"{where}: {reason} writing {what}: {space}; {hint}") from exc
