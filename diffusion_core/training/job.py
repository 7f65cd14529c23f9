"""Entry point of a training job submitted through the Ray Jobs API (see ``submit.py``).

``python -m diffusion_core.training.job <request>`` runs :func:`diffusion_core.training.train` on
the cluster, logs progress as plain lines, and prints the result as its last line.
"""

from __future__ import annotations

import sys
from typing import Any

from diffusion_core.training.config import TrainConfig
from diffusion_core.training.submit import RESULT_PREFIX, decode_request
from diffusion_core.training.trainer import train


def _log_progress(p: dict[str, Any]) -> None:
    print(
        f"step {p['step']}/{p.get('stop', p['steps'])}  loss {p.get('loss', float('nan')):.4f}  "
        f"{p.get('img_per_s', 0.0):.0f} img/s  lr {p.get('lr', 0.0):.2e}",
        flush=True,
    )


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m diffusion_core.training.job <request>", file=sys.stderr)
        return 2
    req = decode_request(argv[0])
    config = TrainConfig.model_validate(req["config"]) if req.get("config") else None
    result = train(
        config,
        req.get("data"),
        resume=req.get("resume"),
        run_name=req.get("run_name"),
        export_dir=req.get("export_dir"),
        stop_at=req.get("stop_at"),
        fault=req.get("fault"),
        on_progress=_log_progress,
    )
    print(RESULT_PREFIX + result.model_dump_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
