"""Where plgk writes: files with the user's permissions, write failures as one line, one
writer per output (a claim: an flock'd lock file), and no output over the command's own inputs.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import time
from pathlib import Path

from plgk_cli.errors import OutputError


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def respect_umask(path: Path) -> None:
    """Give a file the mode an ordinary open() would (0666 less the umask): some writers
    (safetensors) create theirs 0600, which another user's `plgk check` then cannot read."""
    os.chmod(path, 0o666 & ~_umask())


WHY = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
       errno.EACCES: "permission denied", errno.EPERM: "permission denied",
       errno.EROFS: "the file system is read-only"}


def write_failure(path: Path, exc: OSError, advice: str) -> OutputError:
    """The one-line error for an OSError while writing ``path``: what failed and why, then
    ``advice`` (what to do, e.g. "free space, then continue with --resume")."""
    why = WHY.get(exc.errno, exc.strerror or str(exc))
    return OutputError(f"{path}: cannot be written ({why}); {advice}")


def os_error(exc: BaseException) -> OSError | None:
    """The OSError behind a write failure: ``exc`` itself, or the errno that safetensors
    ("... (os error 28)") and h5py ("errno = 28") put only in their messages; None when it is not one."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc
    match = re.search(r"\(os error (\d+)\)|errno = (\d+)", str(exc))
    if match is None:
        return exc if isinstance(exc, OSError) else None
    number = int(match.group(1) or match.group(2))
    return OSError(number, os.strerror(number))


# ----------------------------------------------------------------------------- one writer per output

RUN_LOCK = ".plgk-lock"  # inside a run directory: claims the run
OUTPUT_LOCK_SUFFIX = ".plgk-lock"  # beside an output file (OUT.plgk-lock): claims the output
CLAIM_ATTEMPTS = 20  # a lock file removed or replaced between open and flock is opened again
BUSY_RETRY_SECONDS = 0.2  # a probe (lock_holder) holds a lock for microseconds: wait it out

_held: dict = {}  # (st_dev, st_ino) of each lock file and run directory this process holds -> Claim


class Claim:
    """The single writer's hold on an output: an flock(LOCK_EX) on its lock file, which holds the
    writer's pid, and for a run directory on the directory itself too (a claim that must leave no
    file behind, on the run an --overwrite replaces, holds that one only). The operating system
    drops the locks when the process dies (no stale claims); release() drops them sooner.
    ``keep`` is what release() does with the lock file by default: leave it (emptied of the pid)
    or remove it (with the directories the claim created)."""

    def __init__(self, lock: Path | None, fds: list, created_dirs: list, keep: bool):
        self.lock, self._fds, self._created_dirs, self.keep = lock, fds, created_dirs, keep
        self._keys = [_key(fd) for fd in fds]
        _held.update(dict.fromkeys(self._keys, self))

    def moved(self, lock: Path) -> None:
        """The lock file was renamed (its run directory swapped into place): it is now ``lock``."""
        self.lock, self._created_dirs = Path(lock), []

    def release(self, keep: bool | None = None) -> None:
        """Drop the claim. ``keep`` (default: the claim's own) leaves the lock file, emptied: an
        unfinished run's marker that it was written by a plgk that locks
        (trajectory.check_replaceable_run_dir); else the lock file goes, then each directory the
        claim created, if empty. A lock file that no longer is this claim's (removed with its
        directory, renamed) is left alone."""
        if not self._fds:
            return
        keep = self.keep if keep is None else keep
        try:
            if self.lock is not None and _names(self.lock, self._fds[0]):
                if keep:
                    os.ftruncate(self._fds[0], 0)
                else:
                    # unlinked while still locked: whoever opened it meanwhile and then gets the
                    # lock finds the path naming another file, or none, and opens again (_lock)
                    os.unlink(self.lock)
                    _remove_empty(self._created_dirs)
        except OSError:
            pass  # best effort: an exit path must not fail on its cleanup
        finally:
            for key in self._keys:
                _held.pop(key, None)
            for fd in self._fds:
                os.close(fd)
            self._fds = []

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _key(fd: int) -> tuple:
    stat = os.fstat(fd)
    return stat.st_dev, stat.st_ino


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        stat = os.stat(path)
    except OSError:
        return False
    return (stat.st_dev, stat.st_ino) == _key(fd)


def _pid_at(lock: Path) -> int | None:
    """The pid a lock file names, if it names one."""
    try:
        text = lock.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _flock_busy(fd: int, operation: int) -> bool:
    """Try the lock for BUSY_RETRY_SECONDS; True if another holder kept it all along."""
    deadline = time.monotonic() + BUSY_RETRY_SECONDS
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return True
            time.sleep(0.01)


def _lock(path: Path, busy, *, directory: bool = False, create: bool = True) -> tuple[int | None, bool]:
    """(descriptor, whether this call created the file) of ``path`` opened and flock'd; (None,
    False) for a file that is missing where ``create`` is off. ``busy(pid)``: the OutputError for
    a lock another process holds. OSError where the file cannot be created."""
    flags = os.O_RDONLY | os.O_DIRECTORY if directory else os.O_RDWR
    for _ in range(CLAIM_ATTEMPTS):
        created = False
        try:
            if directory or not create:
                fd = os.open(path, flags)
            else:
                try:
                    fd, created = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o666), True
                except FileExistsError:
                    fd = os.open(path, flags)
        except FileNotFoundError:
            if not (directory or create):
                return None, False
            if directory:  # removed with its run by its last writer: this claim makes it again
                path.mkdir(exist_ok=True)
            continue
        try:
            if _flock_busy(fd, fcntl.LOCK_EX):
                raise busy()
            if _names(path, fd):
                return fd, created
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # its holder removed it before letting go: take the one now at the path
        if directory:
            path.mkdir(exist_ok=True)
    raise OSError(errno.EAGAIN, "it kept being replaced while it was locked", str(path))


def _write_pid(fd: int) -> None:
    """This process's pid into the lock file it holds, for the message a second writer gets."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _remove_empty(directories: list) -> None:
    for directory in reversed(directories):
        try:
            directory.rmdir()
        except OSError:
            return


def _run_busy(run_dir: Path, out_name: str) -> OutputError:
    pid = _pid_at(Path(run_dir) / RUN_LOCK)
    who = "another plgk process" + ("" if pid is None else f" (pid {pid})")
    return OutputError(f"{run_dir}: {who} is writing this run; wait for it to finish or choose "
                       f"another {out_name}")


def claim_run_dir(run_dir: Path, out_name: str = "--out", *, mark: bool = True) -> Claim:
    """Claim the run directory ``run_dir`` (creating it and its missing parents) for this
    process's writer, before anything in it is checked or written: OutputError if another
    process holds it; OSError if it cannot be created. ``mark``: write the lock file, with this
    process's pid (off for the run an --overwrite replaces, which must stay as it is even after a
    SIGKILL: its existing lock file, if any, is locked, and the directory). The lock file stays
    in an unfinished run (release(keep=True)) and goes when the run completes or the claim finds
    nothing to write."""
    run_dir = Path(run_dir)
    created = []
    for directory in reversed([run_dir, *run_dir.parents]):
        if not directory.exists():
            try:
                directory.mkdir()
                created.append(directory)
            except FileExistsError:
                pass

    def busy():
        return _run_busy(run_dir, out_name)

    fds = []
    try:
        fds.append(_lock(run_dir, busy, directory=True)[0])
        fd, created_file = _lock(run_dir / RUN_LOCK, busy, create=mark)
        if fd is not None:
            fds.insert(0, fd)
    except BaseException:
        for fd in fds:
            os.close(fd)
        _remove_empty(created)
        raise
    if mark:
        _write_pid(fds[0])
    return Claim(run_dir / RUN_LOCK if mark else None, fds, created, keep=not created_file)


def output_lock(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + OUTPUT_LOCK_SUFFIX)


def claim_output(out: Path) -> Claim:
    """Claim the output file ``out`` (its lock file OUT.plgk-lock, with this process's pid,
    removed on release) before any work: OutputError if another replay holds it; OSError if the
    lock file cannot be created."""
    lock = output_lock(out)

    def busy():
        pid = _pid_at(lock)
        who = "another plgk replay" + ("" if pid is None else f" (pid {pid})")
        return OutputError(f"{out}: {who} is writing this output; wait for it or choose another --out")

    fd, _ = _lock(lock, busy)
    _write_pid(fd)
    return Claim(lock, [fd], [], keep=False)


def lock_holder(path: Path) -> tuple[bool, int | None]:
    """(whether another process holds the lock on the lock file or directory ``path``, the pid
    in the lock file if it names one); (False, None) where no one does or this process does.
    Creates nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False, None
    try:
        if _key(fd) in _held:
            return False, None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True, _pid_at(path / RUN_LOCK if path.is_dir() else path)
        return False, None
    finally:
        os.close(fd)  # and with it the probe's shared lock


def check_run_not_claimed(run_dir: Path, out_name: str = "--out") -> None:
    """Refuse (OutputError) a run directory another process is writing; creates nothing."""
    run_dir = Path(run_dir)
    if lock_holder(run_dir)[0] or lock_holder(run_dir / RUN_LOCK)[0]:
        raise _run_busy(run_dir, out_name)


# ----------------------------------------------------------------------------- outputs apart from inputs

def _real(path) -> Path:
    return Path(os.path.realpath(path))


def check_apart_from_inputs(outputs: dict, inputs: dict, command: str) -> None:
    """Refuse (OutputError, even with --overwrite) a command that would write over what it reads:
    an output path (``outputs``: name -> path; the first is the output itself, by its option's
    name, the others files written beside it) that is an input, lies inside an input directory, or
    holds an input (an output directory). ``inputs``: option -> path; symbolic links are resolved."""
    name, out = next(iter(outputs.items()))
    for what, output in outputs.items():
        written = _real(output)
        for option, source in inputs.items():
            read = _real(source)
            if written == read:
                relation = "is"
            elif read in written.parents:
                relation = "lies inside"
            elif written in read.parents:
                relation = "holds"
            else:
                continue
            subject = "" if output == out else f"its {what} {output} "
            raise OutputError(f"{out}: {subject}{relation} {option} {source}, an input of this {command}; "
                              f"{name} never replaces what the command reads, not even with --overwrite: "
                              f"choose another {name}")


def remedy(exc: OSError) -> str:
    """What fixes the write failure ``exc``, for the advice of write_failure."""
    return "free space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that"


def check_can_create(directory: Path, out_name: str = "--out") -> None:
    """Refuse (OutputError), before any work, a directory that cannot be written or created: it,
    or where it does not exist the nearest folder above it, must be a writable folder."""
    existing = next(p for p in (Path(directory), *Path(os.path.abspath(directory)).parents) if p.exists())
    if not existing.is_dir():
        raise OutputError(f"{existing}: is not a directory, so {directory} cannot be created; choose "
                          f"another {out_name}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{existing}: not writable; choose another {out_name}")
