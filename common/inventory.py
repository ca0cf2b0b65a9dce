"""What a folder holds, recorded when it is written and checked before it is trusted: each file's name, size and
sha256. A checkpoint records its inventory in its completion marker; a resume or an export checks it, so that a file
lost, truncated or damaged on disk since the save is named instead of failing deep inside a loader."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def take_inventory(folder: Path, exclude: frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """{relative path: {"size": bytes, "sha256": hex}} of every file under `folder`, but the names in `exclude`."""
    inventory = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name not in exclude:
            inventory[name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return inventory


def inventory_problems(folder: Path, inventory: dict[str, dict[str, Any]], checksums: bool = True) -> list[str]:
    """What differs from the record, one phrase per file ("model_states.pt: missing", "...: 10 bytes, 4096 recorded",
    "...: sha256 differs"); empty when the folder holds what was recorded. Files added since are not looked at."""
    problems = []
    for name, record in inventory.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif (size := path.stat().st_size) != record["size"]:
            problems.append(f"{name}: {size} bytes, {record['size']} recorded")
        elif checksums and file_sha256(path) != record["sha256"]:
            problems.append(f"{name}: sha256 differs from the one recorded")
    return problems
