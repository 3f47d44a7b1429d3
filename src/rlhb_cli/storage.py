"""How rlhb writes files, so that nothing half-written is ever taken for whole.

Atomic writes (a temporary name, flushed, then renamed), content hashes, the record of a stage's outputs
that `rlhb status` checks them against, and the lock that keeps one writer per stage. Errors of the
file system (a full disk, a read-only directory) are turned into one line naming the path.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from rlhb_cli import distributed
from rlhb_cli.distributed import is_main_process
from rlhb_cli.errors import RlhbError

LOCK = ".lock"


# ----------------------------------------------------------------------------------------- writing
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write, flush, then rename: readers see the old file or the whole new one, never a part.
    Under a launcher only the main process writes (the others hold the same bytes)."""
    if not is_main_process():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_jsonl(path: Path, rows) -> None:
    """One JSON object a line, written whole or not at all."""
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename.
    Under a launcher the other processes write into scratch space that is thrown away."""
    if not is_main_process():
        scratch = Path(tempfile.mkdtemp(prefix=f"rlhb-rank{distributed.process_index()}-"))
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied"}
# how libraries that wrap the system's error (safetensors, torch's zip writer) word it
_DISK_WORDS = {"No space left on device": "the disk is full", "os error 28": "the disk is full",
               "Disk quota exceeded": "the disk quota is used up", "Read-only file system": "the file system is read-only",
               "file write failed": "a write failed (is the disk full?)"}


def disk_error_message(exc: BaseException) -> str | None:
    """One line for a file-system error a user fixes outside rlhb (a full disk, a read-only directory, no
    permission), found in the exception or what caused it; None for any other error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        reason, where = None, None
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRORS:
            reason, where = _DISK_ERRORS[exc.errno], exc.filename
        else:
            reason = next((said for words, said in _DISK_WORDS.items() if words in str(exc)), None)
        if reason is not None:
            return (f"{where or 'a file of the run'}: cannot write, {reason}; the stage is not marked done: "
                    f"make room (or fix the permission) and run it again")
        exc = exc.__cause__ or exc.__context__
    return None


# ----------------------------------------------------------------------------------------- hashing
def sha256_of(path: Path) -> str:
    """sha256 of a file, or of a directory as the sorted (relative path, file hash) list."""
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(child.relative_to(path)).encode())
            digest.update(sha256_of(child).encode())
        return digest.hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


CARD = "README.md"  # a model card: a description, rewritten as figures arrive (models/card.py), not an output


def _output_files(folder: Path, leave_out: set[str]) -> list[Path]:
    """Every file of a stage's folder but its manifest, the lock, model cards and hidden temporaries."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in leave_out and p.name != CARD
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def record_outputs(folder: Path, leave_out: set[str],
                   only: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """{relative path: bytes, mtime_ns, sha256} of what a stage left (every file of its folder, or `only`
    these): what `check_outputs` holds it to."""
    paths = [folder / name for name in only] if only else _output_files(folder, leave_out)
    # hashlib and file reads let go of the GIL, so the files of a large data set hash on every core at once
    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(paths), os.cpu_count() or 1))) as pool:
        digests = list(pool.map(sha256_of, paths))
    recorded = {}
    for path, digest in zip(paths, digests):
        stat = path.stat()
        recorded[str(path.relative_to(folder))] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                                   "sha256": digest}
    return recorded


def check_outputs(folder: Path, recorded: dict[str, dict[str, Any]], rehash: bool = False) -> str:
    """"" when every recorded output is as written, else what is wrong with the first one that is not.
    The fast path trusts a file whose size and modification time are unchanged; `rehash` reads it all."""
    for name, info in recorded.items():
        if Path(name).name == CARD:  # a card recorded by a run made before cards were descriptions
            continue
        path = folder / name
        try:
            stat = path.stat()
        except OSError:
            return f"{name} is missing"
        if stat.st_size != info["bytes"]:
            return f"{name} has {stat.st_size} bytes, {info['bytes']} were written"
        if (rehash or stat.st_mtime_ns != info["mtime_ns"]) and sha256_of(path) != info["sha256"]:
            return f"{name} changed since it was written (its sha256 differs)"
    return ""


# ----------------------------------------------------------------------------------------- locking
_held: dict[str, list] = {}  # lock path -> [file descriptor, depth]: a process may take its own lock again


@contextlib.contextmanager
def stage_lock(folder: Path, name: str = LOCK, what: str | None = None) -> Iterator[None]:
    """One writer at a time for a stage: an exclusive `flock` on FOLDER/.lock, which the kernel releases when
    the holder dies, so a lock left by a killed process is taken over safely. A second writer is refused
    at once, with the holder's pid, host and command. Only the main process of a launcher takes it."""
    if not is_main_process():
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    key = str(path.resolve())
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RlhbError(f"{what or folder} is being written by pid {holder.get('pid', '?')} on "
                        f"{holder.get('host', '?')} since {holder.get('since', '?')} "
                        f"({' '.join(holder.get('command', []))[:120]}); wait for it to end or stop it") from None
    except OSError as exc:  # a file system without locks (some network mounts)
        os.close(fd)
        raise RlhbError(f"{path}: cannot lock ({exc.strerror}); put the run directory on a local disk") from None
    _held[key] = [fd, 1]
    try:
        os.ftruncate(fd, 0)
        since = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": platform.node(), "since": since,
                                  "command": sys.argv}).encode(), 0)
        yield
    finally:
        del _held[key]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def lock_holder(folder: Path, name: str = LOCK) -> dict | None:
    """Who holds a stage's lock now ({pid, host, since, command}), or None when no process does."""
    path = Path(folder) / name
    key = str(path.resolve())
    if key in _held:
        return _read_holder(_held[key][0])
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _read_holder(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace") or "{}")
    except (OSError, json.JSONDecodeError):
        return {}
