"""HDF5 shard files and the manifest that describes a shard folder.

Schema (version 1), one file per shard, datasets named as NVIDIA's BERT loaders expect:

| dataset                | shape  | dtype  | meaning                                            |
|------------------------|--------|--------|----------------------------------------------------|
| input_ids              | [N, L] | uint16 | [CLS] A [SEP] B [SEP], masked, padded with 0       |
| input_mask             | [N, L] | uint8  | 1 for real tokens, 0 for padding                   |
| segment_ids            | [N, L] | uint8  | 0 for [CLS] A [SEP], 1 for B [SEP], 0 for padding  |
| masked_lm_positions    | [N, P] | uint16 | sorted positions of the predictions, padded with 0 |
| masked_lm_ids          | [N, P] | uint16 | original ids at those positions, padded with 0     |
| next_sentence_labels   | [N]    | uint8  | sentence-order label: 1 = swapped, 0 = in order    |

Unmasked shards (`albert-data shard --masking dynamic`; format albert-sop-unmasked, schema version 1; the manifest's
attributes say "masking": "dynamic") hold each pair once, unmasked, for the loader to mask each epoch
(pipeline/masking.py): input_ids (not masked), input_mask, segment_ids, next_sentence_labels as above, and

| word_starts            | [N, L] | uint8  | 1 where a whole word starts (maskable positions only)  |

Position 0 is always [CLS] and is never predicted, so a prediction slot is padding exactly when its
position is 0. Files are written with gzip (level 1: 30% faster than 4, 3% larger) + shuffle filters in chunks of 1024 rows, without
timestamps, so the same examples give byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from common.atomic import atomic_path, write_text

from .errors import DataPrepError
from .examples import record_dtype, unmasked_record_dtype

SCHEMA_VERSION = 1  # of the shard files (above); also in each file's attributes
FORMAT = "albert-sop-mlm"
UNMASKED_FORMAT = "albert-sop-unmasked"  # pairs for masking in the loader
UNMASKED_SCHEMA_VERSION = 1
MASKINGS = ("static", "dynamic")
MANIFEST = "manifest.json"
# The layout of manifest.json. 1: without this field (some made before the shard size setting lack
# settings.shard_bytes and versions); 2: also records manifest_version; 3: also each input's times, cuts and sha256
# (data_prep.stage.recorded_inputs). A newer one is refused.
MANIFEST_VERSION = 3
FIELDS = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids", "next_sentence_labels")
UNMASKED_FIELDS = ("input_ids", "input_mask", "segment_ids", "word_starts", "next_sentence_labels")
CHUNK_ROWS = 1024
WRITE_ROWS = 8 * CHUNK_ROWS  # whole chunks per write: each is compressed once


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def shard_schema(masking: str) -> tuple[str, int]:
    """(format, schema version) of the shards of a masking kind."""
    return (UNMASKED_FORMAT, UNMASKED_SCHEMA_VERSION) if masking == "dynamic" else (FORMAT, SCHEMA_VERSION)


def stored_fields(masking: str) -> tuple[str, ...]:
    """The datasets of a shard of this masking kind."""
    return UNMASKED_FIELDS if masking == "dynamic" else FIELDS


def write_shard(path: Path, records: np.ndarray, attrs: dict[str, Any], order: np.ndarray | None = None) -> None:
    """Write records (in `order`, if given) to `path` atomically (temporary name, then rename).
    Rows are gathered and written WRITE_ROWS at a time, so the peak is the records plus one slice. The schema follows
    attrs["masking"] (static when absent)."""
    n = len(records)
    masking = attrs.get("masking", "static")
    order = np.arange(n) if order is None else order
    with atomic_path(path) as tmp, h5py.File(tmp, "w", libver="earliest", track_order=False) as f:
        datasets = {}
        for name in stored_fields(masking):
            shape = (n,) + records.dtype[name].shape
            # (an empty shard, possible with more shards than examples, cannot be chunked)
            storage = (
                dict(chunks=(min(CHUNK_ROWS, n),) + shape[1:], compression="gzip", compression_opts=1, shuffle=True)
                if n
                else {}
            )
            datasets[name] = f.create_dataset(
                name, shape=shape, dtype=records.dtype[name].base, track_times=False, **storage
            )
        for start in range(0, n, WRITE_ROWS):
            part = records[order[start : start + WRITE_ROWS]]
            for name, ds in datasets.items():
                ds[start : start + len(part)] = part[name]
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["num_examples"] = len(records)
        f.attrs["format"], f.attrs["schema_version"] = shard_schema(masking)


def read_shard(path: Path, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Read rows [start, stop) of a shard (static or unmasked) as structured records."""
    with h5py.File(path, "r") as f:
        seq_length = f["input_ids"].shape[1]
        stop = f["input_ids"].shape[0] if stop is None else stop
        fields: tuple[str, ...]
        if "word_starts" in f:
            fields, dtype = UNMASKED_FIELDS, unmasked_record_dtype(seq_length)
        else:
            fields, dtype = FIELDS, record_dtype(seq_length, f["masked_lm_positions"].shape[1])
        out = np.zeros(max(stop - start, 0), dtype=dtype)
        for name in fields:
            out[name] = f[name][start:stop]
    return out


@dataclass
class Manifest:
    data: dict[str, Any]

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.data["shards"]

    @property
    def masking(self) -> str:
        """static: masked shards; dynamic: unmasked pairs that the loader masks (told by the format)."""
        return "dynamic" if self.data["format"] == UNMASKED_FORMAT else "static"

    @property
    def version(self) -> int:
        """The manifest's layout (MANIFEST_VERSION); 1 for manifests that did not record it."""
        return self.data.get("manifest_version", 1)

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise DataPrepError(f"{path}: no manifest (not a shard folder made by `albert-data shard`?)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataPrepError(f"{path}: not valid JSON ({e})") from None
        for key in ("format", "schema_version", "shards", "settings", "vocab"):
            if key not in data:
                raise DataPrepError(f"{path}: missing key {key!r}")
        if (data["format"], data["schema_version"]) not in (shard_schema(m) for m in MASKINGS):
            raise DataPrepError(
                f"{path}: format {data['format']} v{data['schema_version']}, expected {FORMAT} v{SCHEMA_VERSION} "
                f"(masked) or {UNMASKED_FORMAT} v{UNMASKED_SCHEMA_VERSION} (unmasked, for dynamic masking)"
            )
        manifest = cls(data)
        if manifest.version > MANIFEST_VERSION:
            raise DataPrepError(
                f"{path}: made by a newer albert-data (manifest version {manifest.version}; this one reads up to "
                f"{MANIFEST_VERSION})"
            )
        return manifest

    def save(self, folder: Path) -> None:
        path = Path(folder) / MANIFEST
        write_text(path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")
