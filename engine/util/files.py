"""Atomic writes and input-path checks.

A file or directory is built under a unique temporary sibling name and moved into place
with os.replace, so a reader never sees half of it and a failure leaves nothing behind:
  - an exception (KeyboardInterrupt included) removes the temporary at once;
  - SIGTERM and SIGHUP remove every live temporary from a signal handler, then the process
    dies of the signal as it would have (exit status 128 + signal);
  - SIGKILL cannot be caught: the next write to the same target removes temporaries whose
    writer process is gone (their names carry its pid; `clean_stale`).

Inputs are checked with `input_path` before anything opens them: a FIFO or device given as
weights would block open() or read forever, and a symlink loop is not "no such file".
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import signal
import stat
import threading
import time
from pathlib import Path


class PathError(ValueError):
    """An input or output path that cannot be used (missing, not a regular file, a loop, ...)."""


# ----------------------------------------------------------------------------- temporaries

_LIVE: dict[str, bool] = {}          # temporary path -> is a directory
_LOCK = threading.RLock()       # re-entrant: the signal handler runs on the thread that may hold it
_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def _remove(p: str, is_dir: bool) -> None:
    try:
        if is_dir:
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            os.unlink(p)
    except OSError:
        pass


def remove_live_temporaries() -> None:
    """Remove every temporary this process is still writing (the signal handler's work)."""
    with _LOCK:
        items = list(_LIVE.items())
        _LIVE.clear()
    for p, is_dir in items:
        _remove(p, is_dir)


def _on_signal(signum, frame):
    remove_live_temporaries()
    signal.signal(signum, signal.SIG_DFL)         # die of the signal, as without the handler
    os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    """Install the cleanup handler from the main thread (signal.signal works only there), and
    only where the signal would kill the process anyway (SIG_DFL): a program that ignores it or
    handles it itself (a graceful shutdown) keeps its behaviour, and a killed run's leftovers are
    then removed by the next write (clean_stale)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in _SIGNALS:
        if signal.getsignal(s) is signal.SIG_DFL:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(s, _on_signal)


def register_temporary(p: str | os.PathLike, is_dir: bool = False) -> None:
    _install_handlers()
    with _LOCK:
        _LIVE[os.fspath(p)] = is_dir


def forget_temporary(p: str | os.PathLike) -> None:
    with _LOCK:
        _LIVE.pop(os.fspath(p), None)


def out_path(path: str | os.PathLike, flag: str = "output") -> Path:
    """An absolute output path with a real last component ('.' and 'a/..' resolved, so a
    temporary sibling can be named after it)."""
    s = os.fspath(path)
    if not s or not s.strip():
        raise PathError(f"{flag}: the path is empty")
    p = Path(os.path.abspath(s))
    if not p.name:
        raise PathError(f"{flag} {s}: cannot write to the root directory; name a file or directory")
    return p


def temp_sibling(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A unique hidden name next to `path` (same directory, so os.replace is a rename).
    The name carries our pid so a later run can tell a dead writer's leftovers (clean_stale)."""
    path = out_path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{tag}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


STALE_AFTER_S = 60      # untouched this long (and its writer gone): a temporary is litter


def clean_stale(path: str | os.PathLike, min_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove temporaries of `path` left by writers that were killed (SIGKILL, power loss):
    `.NAME.PID.HEX.tmp` whose PID is not running and that nobody touched for `min_age_s`
    (a PID of another machine or container sharing the directory looks dead from here; its
    writer would still be touching the file). A stale `.old` (a previous directory moved
    aside while a new one went in) is put back when the target is missing, else removed.
    Returns what was removed or restored; younger leftovers are ignored until a later run."""
    path = out_path(path)
    pat = re.compile(re.escape(f".{path.name}.") + r"(\d+)\.[0-9a-f]{8}\.(tmp|old)\Z")
    done = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return done
    for e in entries:
        m = pat.match(e.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        try:
            if time.time() - e.stat(follow_symlinks=False).st_mtime < min_age_s:
                continue
        except OSError:
            continue
        p = Path(e.path)
        if m.group(2) == "old" and not os.path.lexists(path):
            with contextlib.suppress(OSError):
                os.replace(p, path)
                done.append(p)
            continue
        _remove(e.path, e.is_dir(follow_symlinks=False))
        done.append(p)
    return done


def write_reason(path: Path, e: OSError, creating: bool = False) -> str:
    """Why a write of `path` failed, told about the user's path (not a temporary's name).
    creating: the call that failed was the one creating the file (or directory), so ENOENT in an
    existing directory means that directory takes no new files (/proc, /sys)."""
    parent = path.parent
    if e.errno == errno.ENOENT and not parent.is_dir():
        return f"the directory {parent} does not exist"
    if e.errno == errno.ENOENT and creating:
        return f"{parent} takes no new files"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"no permission to write in {parent}"
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    return e.strerror or str(e)


def write_error(path: Path, e: OSError, flag: str, creating: bool = False) -> OSError:
    """The OSError of a write, retold (write_reason): the errno's own subclass (FileNotFoundError,
    PermissionError, ...), its strerror the sentence the commands print (dgq_cli.flag_message)."""
    return OSError(e.errno, f"{flag} {path}: cannot write: {write_reason(path, e, creating)}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "xb", flag: str = "output"):
    """Open a temporary sibling of `path` for writing; on success it replaces `path`, on any
    error or SIGTERM/SIGHUP it is removed. The sibling is opened with "x" (not mkstemp, whose
    files are 0600) so the file gets the usual mode. OSErrors name `path`, not the sibling."""
    path = out_path(path, flag)
    if path.is_dir():
        raise PathError(f"{flag} {path}: is a directory; name a file")
    if os.path.lexists(path) and not path.is_symlink() and not path.is_file():
        # the final rename would put a regular file where a FIFO, socket or device (/dev/null) was
        raise PathError(f"{flag} {path}: exists and is not a regular file; name a file to write")
    clean_stale(path)
    tmp = temp_sibling(path)
    register_temporary(tmp)
    try:
        try:
            f = open(tmp, mode)
        except OSError as e:
            raise write_error(path, e, flag, creating=True) from None
        try:
            with f:
                yield f
            os.replace(tmp, path)
        except OSError as e:
            raise write_error(path, e, flag) from None
    except BaseException:
        _remove(os.fspath(tmp), False)
        raise
    finally:
        forget_temporary(tmp)


# ----------------------------------------------------------------------------- inputs

def input_path(path, what: str = "file", kind: str = "file") -> Path:
    """Check an input path before anything opens it; return it as a Path.

    kind "file": a regular file (a FIFO, socket or device would block or never end);
    "dir": a directory; "any": either. Raises PathError naming the path and `what` it should be.
    """
    if path is None or isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise PathError(f"{what}: expected a path, got {type(path).__name__}")
    s = os.fspath(path)
    if isinstance(s, bytes):
        s = os.fsdecode(s)
    if not s.strip():
        raise PathError(f"{what}: the path is empty")
    if "\0" in s:
        raise PathError(f"{what} {s!r}: the path holds a NUL byte")
    p = Path(s)
    try:
        st = os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PathError(f"{p}: symbolic link loop; point {what} at a real file") from None
        if e.errno == errno.ENOENT:
            if os.path.islink(p):
                raise PathError(f"{p}: broken symbolic link (its target does not exist)") from None
            raise PathError(f"{p}: does not exist (no such file or directory)") from None
        if e.errno == errno.ENAMETOOLONG:
            raise PathError(f"{what}: the path is too long") from None
        if e.errno == errno.ENOTDIR:
            raise PathError(f"{p}: a component of the path is not a directory") from None
        raise PathError(f"{p}: cannot access: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        if kind == "file":
            raise PathError(f"{p}: is a directory, not a regular file; {what} must be a file")
        return p
    if not stat.S_ISREG(st.st_mode):
        raise PathError(f"{p}: not a regular file (a FIFO, socket or device); {what} must be a file")
    if kind == "dir":
        raise PathError(f"{p}: not a directory; {what} must be a directory")
    return p


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two paths name the same file (symlinks and hard links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def is_within(child: str | os.PathLike, parent: str | os.PathLike) -> bool:
    """True when `child` is `parent` or lies under it, after resolving symlinks."""
    c, p = Path(os.path.realpath(child)), Path(os.path.realpath(parent))
    return c == p or p in c.parents
