"""The identity of what a run trains on, recorded in its checkpoints and compared before any step.

Identity is content, not paths: the vocabulary's sha256 (which the shard manifests record) and a digest of the
shards' own sha256s. Two shard folders of the same vocabulary size but another vocabulary look alike to every check
of form (shapes, sizes, ranges) and would train or evaluate on the wrong token ids without a word."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any


class IdentityError(ValueError):
    """Inputs that do not belong together; the message names both sides and the fix."""


@dataclass(frozen=True)
class DataIdentity:
    folder: str
    vocab_sha256: str
    shards_sha256: str  # sha256 of the manifest's (shard name, shard sha256) list: which examples, in which files

    @classmethod
    def of_manifest(cls, folder, manifest: dict[str, Any]) -> DataIdentity:
        listing = [(entry["name"], entry["sha256"]) for entry in manifest["shards"]]
        digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
        return cls(str(folder), manifest["attributes"]["vocab_sha256"], digest)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def short(digest: str) -> str:
    return digest[:12]


def check_same_vocabulary(train: DataIdentity, other: DataIdentity, role: str = "evaluation") -> None:
    if other.vocab_sha256 != train.vocab_sha256:
        raise IdentityError(
            f"{other.folder}: the {role} shards were made with another vocabulary (sha256 {short(other.vocab_sha256)}) "
            f"than the training shards in {train.folder} ({short(train.vocab_sha256)}); their token ids mean other "
            f"pieces. Make them with the training data's spiece.model (albert-data shard --spm-model ...)"
        )


def check_resume(tag_dir, saved: dict[str, Any] | None, now: DataIdentity, new_data: bool) -> str | None:
    """Refuse to continue a checkpoint on data of another vocabulary, or on other examples unless `new_data` says
    so. Returns a line to log when the data changed on purpose. `saved`: the checkpoint's record (None: written
    before checkpoints recorded it, nothing to compare)."""
    if saved is None:
        return None
    if saved["vocab_sha256"] != now.vocab_sha256:
        raise IdentityError(
            f"{tag_dir}: trained on shards of vocabulary sha256 {short(saved['vocab_sha256'])} ({saved['folder']}), "
            f"but --data {now.folder} has vocabulary {short(now.vocab_sha256)}: the model's embeddings index the "
            "other vocabulary. Resume with shards of the checkpoint's vocabulary, or start a new run (--output elsewhere)"
        )
    if saved["shards_sha256"] == now.shards_sha256:
        return None
    if not new_data:
        raise IdentityError(
            f"{tag_dir}: trained on the shards of {saved['folder']} (digest {short(saved['shards_sha256'])}), but "
            f"--data {now.folder} holds other shards ({short(now.shards_sha256)}); its saved data position means "
            "nothing there. Resume with the same data, or pass --new-data to continue the model on these shards "
            "from their first example"
        )
    return (
        f"--new-data: continuing {tag_dir} on the shards of {now.folder} ({short(now.shards_sha256)}) from their "
        f"first example; it was trained on {saved['folder']} ({short(saved['shards_sha256'])})"
    )
