"""Metadata calls of a command on the files under given folders, counted with `strace -f` (children included).

`traced(cmd)` runs the command under strace (seccomp-bpf: only the traced calls stop the process, so the cost is
small) and returns what it did under each folder: files created (distinct paths opened with O_CREAT), opens,
mkdir, unlink, rename and stat calls. What a parallel filesystem's metadata servers see is these calls.
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
_LINE = re.compile(r'^\d+\s+(\w+)\((?:AT_FDCWD|\d+|-?\d+<[^>]*>)?,?\s*"([^"]*)"(.*)\)\s+=\s+(-?\d+)')
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


def count(log: Path, root: Path) -> Metadata:
    """The calls of an strace log on paths under `root` (absolute paths, as the commands here are given)."""
    prefix = str(root).rstrip("/") + "/"
    meta = Metadata()
    for line in log.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if not m or not (m.group(2) + "/").startswith(prefix):
            continue
        name, path, rest = m.group(1), m.group(2), m.group(3)
        meta.calls[_KIND.get(name, name)] += 1
        if _KIND.get(name) == "open" and ("O_CREAT" in rest or name == "creat") and int(m.group(4)) >= 0:
            meta.created.add(path)
    return meta


def traced(cmd: list[str], roots: list[Path], **kw) -> tuple[subprocess.CompletedProcess, list[Metadata]]:
    """Run `cmd` under strace; (its result, the metadata calls under each root)."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "strace.log"
        proc = subprocess.run(
            ["strace", "-f", "-qq", "--seccomp-bpf", "-e", f"trace={CALLS}", "-o", str(log), *cmd], **kw
        )
        return proc, [count(log, root) for root in roots]
