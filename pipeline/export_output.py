"""albert-export's output folder: its record file, the refusal of folders it did not write, and the swap into place.

An export is written into a hidden temporary sibling of the output (`.NAME.export-XXXX`, same file system), with
`export.json` (where it came from, and the sha256 of every file written) last, and renamed to the output name at
the end. Where the output already holds an earlier export the two folders are exchanged atomically (Linux
renameat2 RENAME_EXCHANGE; elsewhere two renames, the earlier export under `.NAME.replaced-XXXX` in between), then
the earlier one is removed. A process killed at any point leaves the output as it was, plus at most a hidden
sibling that the next export into the same output removes (or, for a `.replaced-` left between the two renames
with no output, puts back).

The output is replaced only when it is an earlier export whose every file is still the one recorded: a folder
albert-export did not write, or one where files were added or changed since, is refused and left untouched.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

from common.atomic import write_text
from common.inventory import file_sha256

log = logging.getLogger("albert-export")

RECORD = "export.json"
TOOL = "albert-export"
RECORD_VERSION = 1


class OutputError(ValueError):
    """The output folder cannot be written as asked; the message names it and the way out."""


def lock_name(out: Path) -> str:
    """The export lock's file, beside the output in its parent folder (the output itself is replaced whole)."""
    return f".{out.name}.lock"


TEMPORARY, REPLACED = "export", "replaced"


def _new_sibling(out: Path, kind: str) -> Path:
    """A new, empty, hidden folder `.NAME.KIND-XXXXXXXX` beside `out`, with the permissions the umask gives a new
    folder (mkdtemp's would be owner-only)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = out.parent / f".{out.name}.{kind}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _siblings(out: Path, kind: str) -> list[Path]:
    pattern = re.compile(rf"\.{re.escape(out.name)}\.{kind}-[0-9a-f]{{8}}")
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir())


def read_record(folder: Path) -> dict[str, Any] | None:
    """The record of an earlier export in `folder`, or None when there is no readable one."""
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("tool") != TOOL or not isinstance(record.get("files"), dict):
        return None
    return record


def _names(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def describe_record(record: dict[str, Any]) -> str:
    source = record.get("checkpoint") or {}
    return f"{source.get('folder', '?')}, tag {source.get('tag', '?')}, written {record.get('written', '?')}"


def check_output(out: Path, overwrite: bool) -> bool:
    """Refuse an output albert-export may not write. True when it holds an earlier export that --overwrite
    replaces; False when it is missing or empty."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output {out}: is a file, not a folder; choose a folder")
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return False
    record = read_record(out)
    if record is None:
        raise OutputError(
            f"--output {out}: the folder is not empty ({_names(entries)}) and is not an earlier albert-export output "
            f"(no {RECORD}); albert-export replaces only its own output: choose a new or empty folder"
        )
    if not overwrite:
        raise OutputError(
            f"--output {out}: holds an earlier export ({describe_record(record)}); pass --overwrite to replace it, "
            "or choose another folder"
        )
    files: dict[str, str] = record["files"]
    added = [name for name in entries if name != RECORD and name not in files]
    changed = [
        name for name, digest in files.items() if not (out / name).is_file() or file_sha256(out / name) != digest
    ]
    if added or changed:
        parts = ([f"added {_names(added)}"] if added else []) + (
            [f"changed or removed {_names(changed)}"] if changed else []
        )
        what = "; ".join(parts)
        raise OutputError(
            f"--output {out}: --overwrite would lose what albert-export did not write there ({what} since the "
            "export); move those out of the folder, or choose another folder"
        )
    return True


def remove_leftovers(out: Path) -> None:
    """Hidden siblings of `out` left by an export that was killed. Call only while holding the export lock: then
    no other export is writing them."""
    for path in _siblings(out, TEMPORARY):
        log.info("removing %s, left by an export that did not finish", path)
        shutil.rmtree(path, ignore_errors=True)
    for path in _siblings(out, REPLACED):
        if not out.exists() and read_record(path) is not None:
            log.warning("%s: putting back the earlier export an interrupted --overwrite had moved aside", out)
            os.rename(path, out)
        else:
            shutil.rmtree(path, ignore_errors=True)


def temporary_folder(out: Path) -> Path:
    return _new_sibling(out, TEMPORARY)


def write_record(folder: Path, provenance: dict[str, Any]) -> dict[str, Any]:
    """export.json: `provenance` plus the sha256 of every file in `folder`; written last."""
    files = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != RECORD}
    record = {"tool": TOOL, "record_version": RECORD_VERSION, **provenance, "files": files}
    write_text(folder / RECORD, json.dumps(record, indent=2) + "\n")
    _default_permissions(folder)
    return record


def _default_permissions(folder: Path) -> None:
    """The files were written under mkstemp's owner-only names; give them what the umask gives a new file."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def swap_into_place(tmp: Path, out: Path, replaces_export: bool) -> None:
    """Rename the finished `tmp` to `out`; an earlier export there is exchanged with it, then removed."""
    _fsync_folder(tmp, files=True)
    try:
        os.rename(tmp, out)  # no output, or an empty folder: replaced in one step
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not replaces_export:
            raise
        if not _exchange(tmp, out):
            aside = _new_sibling(out, REPLACED)
            os.rename(out, aside)  # replaces the empty folder just made
            os.rename(tmp, out)
            tmp = aside
        # `tmp` now holds the earlier export; anything else there means someone wrote into it meanwhile: kept, under
        # a name that no later export cleans up
        record = read_record(tmp)
        expected = {RECORD, *record["files"]} if record else set()
        if {p.name for p in tmp.iterdir()} == expected:
            shutil.rmtree(tmp)
        else:
            kept = out.parent / f"{out.name}.earlier-{secrets.token_hex(4)}"
            os.rename(tmp, kept)
            log.warning("%s: the earlier export gained files while this one was written; kept as %s", out, kept)
    _fsync_folder(out.parent)


def _fsync_folder(folder: Path, files: bool = False) -> None:
    """Flush `folder`'s entries (and with `files`, its files) to disk, so that a rename is never seen before
    the data it names after a power loss."""
    paths = [p for p in folder.iterdir() if p.is_file()] if files else []
    for path in [*paths, folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE). False where the C library or the file system
    does not offer it."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
