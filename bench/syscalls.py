"""Metadata calls of a command on the files under given folders, counted with `strace -f` (children included).

`traced(cmd, roots)` runs the command under strace (seccomp-bpf: only the traced calls stop the process, so the cost
is small) and returns what it did under the folders: files created (distinct paths opened with O_CREAT), opens,
mkdir, unlink, rename and stat calls. What a parallel filesystem's metadata servers see is these calls.
`traced_log` keeps the log (timestamped) for `count` to split by time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

CALLS = "openat,open,creat,mkdir,mkdirat,unlink,unlinkat,rmdir,rename,renameat,renameat2,newfstatat,stat,lstat,statx"
# -ttt -y: `1700000000.123456 unlinkat(3</out/.work/spill>, "f00000-p00000.bin", 0) = 0`
_LINE = re.compile(r'^([\d.]+)\s+(\w+)\((?:AT_FDCWD(?:<[^>]*>)?, |\d+<([^>]*)>, |\d+, )?"([^"]*)"(.*)\)\s+=\s+(-?\d+)')
_KIND = {
    "openat": "open",
    "open": "open",
    "creat": "open",
    "mkdir": "mkdir",
    "mkdirat": "mkdir",
    "unlink": "unlink",
    "unlinkat": "unlink",
    "rmdir": "unlink",
    "rename": "rename",
    "renameat": "rename",
    "renameat2": "rename",
    "newfstatat": "stat",
    "stat": "stat",
    "lstat": "stat",
    "statx": "stat",
}


@dataclass
class Metadata:
    created: set[str] = field(default_factory=set)  # distinct paths opened with O_CREAT
    calls: Counter = field(default_factory=Counter)  # open / mkdir / unlink / rename / stat: count

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def available() -> bool:
    return shutil.which("strace") is not None


def count(log: Path, roots: list[Path], since: float = 0.0, until: float = float("inf")) -> Metadata:
    """The calls of an strace log (-ttt) on paths under `roots` (absolute paths, as the commands here are given), made
    between the times `since` and `until` (seconds since the epoch)."""
    prefixes = tuple(str(root).rstrip("/") + "/" for root in roots)
    meta = Metadata()
    lines = (line for f in sorted(log.iterdir()) for line in f.read_text(errors="replace").splitlines())
    for line in lines:
        match = _LINE.match(line)
        if not match:
            continue
        name, folder, path, rest = match.group(2, 3, 4, 5)
        result = int(match.group(6))
        if folder and not path.startswith("/"):  # relative to a folder's descriptor (rmtree, for one)
            path = f"{folder}/{path}" if path else folder  # (fstat: the descriptor's own file)
        if not (path + "/").startswith(prefixes) or not since <= float(match.group(1)) < until:
            continue
        kind = _KIND.get(name, name)
        meta.calls[kind] += 1
        if kind == "open" and ("O_CREAT" in rest or name == "creat") and result >= 0:
            meta.created.add(path)
    return meta


def traced_log(cmd: list[str], **kw) -> tuple[subprocess.CompletedProcess, Path]:
    """Run `cmd` under strace; (its result, the log: a temporary folder, one file per process (-ff: no call split
    over two lines by another process's), that the caller removes)."""
    log = Path(tempfile.mkdtemp(prefix="strace-"))
    proc = subprocess.run(
        ["strace", "-ff", "-qq", "-ttt", "-y", "--seccomp-bpf", "-e", f"trace={CALLS}", "-o", str(log / "pid"), *cmd],
        **kw,
    )
    return proc, log


def traced(cmd: list[str], roots: list[Path], **kw) -> tuple[subprocess.CompletedProcess, Metadata]:
    """Run `cmd` under strace; (its result, its metadata calls under `roots`)."""
    proc, log = traced_log(cmd, **kw)
    try:
        return proc, count(log, roots)
    finally:
        shutil.rmtree(log)
