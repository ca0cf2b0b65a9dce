"""`python tests/helpers/collective_guard.py ALBERT-PRETRAIN-ARGS...`: albert-pretrain with torch.distributed's collectives
wrapped from the outside, recording each call made from the project's own modules (module, line, function, the
tensor's device) into OUTPUT/collectives-rank<r>.json. The test checks that every collective our code issues passes through
pipeline.comm, whose device check is the one gate between a tensor and the process group."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "gather",
    "scatter",
)


def record_calls(calls: list[dict]) -> None:
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def guarded(*args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1)
            module = caller.f_globals.get("__name__", "")
            if module.startswith("pipeline"):
                tensor = args[0] if args and hasattr(args[0], "device") else kwargs.get("tensor")
                calls.append(
                    {
                        "collective": _name,
                        "module": module,
                        "line": caller.f_lineno,
                        "function": caller.f_code.co_name,
                        "device": str(tensor.device) if tensor is not None else None,
                    }
                )
            return _original(*args, **kwargs)

        setattr(dist, name, guarded)


def main() -> int:
    argv = sys.argv[1:]
    calls: list[dict] = []
    record_calls(calls)
    from pipeline.pretrain import main as pretrain

    try:
        return pretrain(argv)
    finally:
        out = Path(argv[argv.index("--output") + 1])
        (out / f"collectives-rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(calls))


if __name__ == "__main__":
    sys.exit(main())
