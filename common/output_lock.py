"""One writer per output folder: an exclusive lock that the kernel releases when its holder dies.

    lock = hold_output(Path("runs/x"))   # held until the process exits; or `with OutputLock(folder): ...`

The lock is `fcntl.flock(LOCK_EX | LOCK_NB)` on a file inside the folder (`.lock` by default). The holder writes
its host, pid, start time and command line into that file, so that a second process refuses with one line naming
it: "runs/x is in use by pid 1234 on host h since 2025-01-02T03:04:05+00:00 (albert-pretrain ...)". The file's
content is only a description; the lock is the kernel's, and the file is never removed (removing a lock file
while another process has it open would let two processes hold "the" lock).

What it guarantees:
- Local file systems: at most one holder among the processes of this machine. The kernel releases the lock when
  the holder exits in any way, SIGKILL and out-of-memory kills included, so a dead holder never blocks the next
  one and there is nothing stale to clean up. A child forked while the lock is held shares it (flock belongs to
  the open file, which fork duplicates) and the lock lasts until the child exits too; programs it execs do not
  inherit it (the descriptor is close-on-exec).
- NFS: Linux's NFS client turns flock into a whole-file byte-range lock held on the server (NFSv4, or NFSv3
  with lockd), so the lock excludes processes on other hosts as well. A holder that dies on a running host
  releases it at once; if the holder's host crashes, the server frees it when the host's lease ends (NFSv4,
  typically 90 s) or when the host reboots (NFSv3). Mounted with `nolock` or `local_lock=flock|all`, flock is
  local to each host and two hosts can both hold it: that cannot be detected from here.
- Lustre needs the `flock` mount option (`localflock` makes it per node, as above); without it flock fails and
  `LockUnsupported` says so. GPFS and BeeGFS support flock across nodes.
- Within one process: `hold_output` of a folder already held by this process returns the same lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

LOCK_NAME = ".lock"
# A holder writes its description right after taking the lock; a reader that finds the file empty in between
# waits this long for it before naming no one.
DESCRIPTION_WAIT_S = 1.0


class OutputInUse(RuntimeError):
    """Another process holds the folder's lock; the message names it."""


class LockUnsupported(OSError):
    """The file system refuses flock (e.g. Lustre mounted without `-o flock`)."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    since: str  # when it took the lock, ISO 8601 with the UTC offset
    command: str

    @classmethod
    def this_process(cls) -> Holder:
        now = datetime.now().astimezone().isoformat(timespec="seconds")
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else ""
        return cls(socket.gethostname(), os.getpid(), now, command)

    def describe(self) -> str:
        command = f" ({self.command})" if self.command else ""
        return f"pid {self.pid} on host {self.host} since {self.since}{command}"


class OutputLock:
    """The exclusive lock of one output folder. `label` names the folder in messages (default: its path)."""

    def __init__(self, folder: str | os.PathLike, lock_name: str = LOCK_NAME, label: str | None = None):
        self.folder = Path(folder)
        self.path = self.folder / lock_name
        self.label = label or str(self.folder)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> Holder:
        """Take the lock without waiting and describe this process in the lock file; `OutputInUse` if another
        process holds it. The folder is created if missing."""
        if self._fd is not None:
            raise RuntimeError(f"{self.label}: this lock is already held by this process")
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # no O_TRUNC: the holder's text
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputInUse(f"{self.label} is in use by {self._describe_holder()}") from None
            if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise LockUnsupported(
                    e.errno,
                    f"{self.path}: the file system does not support flock ({os.strerror(e.errno)}); "
                    "on Lustre mount with -o flock",
                ) from None
            raise
        holder = Holder.this_process()
        text = json.dumps(asdict(holder)) + "\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return holder

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # no description of a holder that is gone
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _describe_holder(self) -> str:
        """The holder's description. Right after taking the lock a holder has not yet replaced the description of the
        previous one (which may have been killed before it could clear it): a description of a process of this host
        that no longer exists is such a leftover, and is read again until the new holder has written its own."""
        deadline = time.monotonic() + DESCRIPTION_WAIT_S
        while True:
            try:
                holder = Holder(**json.loads(self.path.read_text()))
                if holder.host != socket.gethostname() or _alive(holder.pid) or time.monotonic() > deadline:
                    return holder.describe()
            except (OSError, ValueError, TypeError):
                if time.monotonic() > deadline:
                    return f"another process (it has not described itself in {self.path})"
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


_held: dict[Path, OutputLock] = {}


def hold_output(folder: str | os.PathLike, lock_name: str = LOCK_NAME, label: str | None = None) -> OutputLock:
    """Lock `folder` for the rest of this process's life (see the module's docstring); `OutputInUse` names the
    holder when another process has it."""
    key = (Path(folder) / lock_name).resolve()
    if key not in _held or not _held[key].held:
        lock = OutputLock(folder, lock_name, label)
        lock.acquire()
        _held[key] = lock  # kept referenced: a collected lock would close its descriptor and release the lock
    return _held[key]
