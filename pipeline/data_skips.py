"""Examples a run leaves out, and where in the loader's order it leaves them out.

A skip is recorded at a position of the loader (an epoch, the chain of plans that cut it so far, and the micro-batches
the current plan had handed out per rank: `at`). Two kinds:
- "window": the rows that plan would hand out in micro-batches [at, until) on every rank (the batches of an anomalous
  optimizer step and a margin after it: the run rolled back and goes on without them);
- "shard": every row of an unreadable shard, from that position on, and in every later epoch.

The loader applies a skip by ending the plan in progress at `at` and cutting what it had not handed out, less the
skipped rows, anew for its ranks (the rule the module docstring of pipeline.data gives for a change of plan). So a
skip is one more link in the epoch's chain of plans; the chain is part of the saved position, and every resume, on
any layout, cuts the same rows. A skip known to a run that resumes from a position before it is applied when the
loader gets there (`future`), exactly as the run that recorded it did; one recorded in another history of the epoch
(another layout, or a run given the skips file of another) is applied at once where the run resumes (`due`).

The skips of a run live in its checkpoints (the loader's state) and in OUTPUT/data-skips.json (rank 0 writes it
whenever it changes), so that a resume from a checkpoint written before a skip still knows it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common.atomic import write_text

FILE = "data-skips.json"
VERSION = 1


class SkipsFileError(Exception):
    """A data-skips.json that cannot be used; the message names the file."""


def skip_id(skip: dict[str, Any]) -> str:
    """A window skip's id is its content; a shard skip's is the shard's name (one per shard: the loader keeps the
    earliest, whatever the problem's wording at each start)."""
    what = {"kind": "shard", "shard": skip["shard"]} if skip["kind"] == "shard" else skip
    return hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def window_skip(position: dict[str, Any], plan: Any, until: int, step: int, cause: str) -> dict[str, Any]:
    """The micro-batches [position's, until) of `plan` (a pipeline.data.Plan) in position's epoch."""
    return _skip("window", position, plan, step, cause, until=until)


def shard_skip(position: dict[str, Any], plan: Any, shard: str, step: int, cause: str) -> dict[str, Any]:
    """Every row of `shard` from `position` on."""
    return _skip("shard", position, plan, step, cause, shard=shard)


def _skip(kind: str, position: dict[str, Any], plan: Any, step: int, cause: str, **what: Any) -> dict[str, Any]:
    where = {
        "epoch": position["epoch"],
        "plan": asdict(plan),
        "earlier": position["earlier"],
        "at": position["micro_batch"],
    }
    return {"kind": kind, **where, **what, "step": step, "cause": cause}


def relation(skip: dict[str, Any], epoch: int, earlier: list[dict], plan: dict[str, int], handed: int) -> str:
    """Where `skip` stands for a loader at this position (epoch, chain `earlier`, `plan` having handed `handed`
    micro-batches per rank): "applied" (in the chain already), "future" (this position lies on the history that
    recorded it, before it: apply it on getting there), "due" (apply it here, now), or "none" (not this epoch's)."""
    sid = skip_id(skip)
    if any(sid in e.get("removed", ()) for e in earlier):
        return "applied"
    if skip["epoch"] > epoch:
        return "future"
    if skip["epoch"] < epoch:
        return "due" if skip["kind"] == "shard" else "none"
    chain, depth = skip["earlier"], len(earlier)
    if chain[:depth] != earlier:
        return "due"
    if len(chain) == depth:  # recorded under the plan in progress
        if skip["plan"] != plan:
            return "due"
        return "future" if handed < skip["at"] else "due"
    # recorded after this plan ended at link["micro_batch"]: on this history if skips ended it (they will again, on
    # getting there), not if a resume on another layout did
    link = chain[depth]
    same_plan = {k: link[k] for k in ("world", "micro", "window")} == plan
    return "future" if link.get("removed") and same_plan and handed <= link["micro_batch"] else "due"


def read(path: Path, data_identity: dict[str, Any] | None, seed: int | None = None) -> list[dict[str, Any]]:
    """The skips in a data-skips.json; refused when recorded for other training data, or when it has window skips
    and was written by a run with another --seed (the shuffle, so the examples at a position, depends on it; a
    shard skip does not)."""
    try:
        doc = json.loads(path.read_text())
        skips, version, data = doc["skips"], doc["version"], doc.get("data")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SkipsFileError(f"{path}: not a data-skips file ({e})") from None
    if version > VERSION:
        raise SkipsFileError(f"{path}: data-skips version {version} is newer than this albert-pretrain's {VERSION}")
    if data_identity is not None and data is not None and data.get("shards_sha256") != data_identity["shards_sha256"]:
        raise SkipsFileError(
            f"{path}: records examples of other training data ({data.get('folder', '?')}) than this run's "
            f"({data_identity.get('folder', '?')})"
        )
    if not isinstance(skips, list) or not all(isinstance(s, dict) and "kind" in s for s in skips):
        raise SkipsFileError(f"{path}: 'skips' is not a list of skips")
    recorded = doc.get("seed")
    if seed is not None and recorded is not None and recorded != seed and any(s["kind"] == "window" for s in skips):
        raise SkipsFileError(
            f"{path}: its window skips were recorded by a run with --seed {recorded}; this run has --seed {seed}, "
            "under which their positions hold other examples"
        )
    return skips


def write(path: Path, skips: list[dict[str, Any]], data_identity: dict[str, Any], seed: int) -> None:
    doc = {"version": VERSION, "data": data_identity, "seed": seed, "skips": skips}
    write_text(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")
