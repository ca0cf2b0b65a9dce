"""Inputs read through their compression, chosen by the file name's suffix (.gz, .bz2, .xz), for every format."""

from __future__ import annotations

import bz2
import gzip
import lzma
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, cast

from .errors import DataPrepError

# What a corrupt or truncated compressed file raises while it is read: gzip reports a bad header or checksum as an
# OSError but damaged deflate data as zlib.error, which is not one.
DECOMPRESSION_ERRORS = (EOFError, OSError, lzma.LZMAError, zlib.error)

_OPENERS: dict[str, Callable[..., object]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def compression(path: Path) -> str | None:
    """ ".gz", ".bz2" or ".xz" for a compressed input, else None."""
    suffix = Path(path).suffix.lower()
    return suffix if suffix in _OPENERS else None


def without_compression(name: str) -> str:
    """The file name as it reads once decompressed: "a.jsonl.gz" -> "a.jsonl"."""
    suffix = compression(Path(name))
    return name[: -len(suffix)] if suffix else name


def open_input(path: Path) -> BinaryIO:
    """The file's bytes, decompressed when its name says it is compressed."""
    path = Path(path)
    opener = _OPENERS.get(compression(path) or "", open)
    try:
        return cast(BinaryIO, opener(path, "rb"))
    except FileNotFoundError:
        raise DataPrepError(f"{path}: no such file or directory") from None
    except IsADirectoryError:
        raise DataPrepError(f"{path}: is a directory (expand_inputs() lists its files)") from None
    except OSError as exc:
        raise DataPrepError(f"{path}: cannot read ({exc.strerror or exc})") from None


def decompression_error(path: Path, exc: BaseException) -> DataPrepError:
    """The one-line message for a compressed input that cannot be read to its end."""
    kind = (compression(path) or "").lstrip(".") or "compressed"
    if isinstance(exc, EOFError):
        return DataPrepError(f"{path}: truncated {kind} file (compressed stream ended early)")
    return DataPrepError(f"{path}: corrupt {kind} data ({exc})")
