"""The ingest flow: raw image/caption data → versioned webdataset shards (``docs/data.md``).

A thin Prefect 3 flow over :func:`diffusion_core.data.ingest.ingest`: typed parameters (the
pydantic :class:`~diffusion_core.data.ingest.IngestConfig`, safety options included:
``allow_roots``, ``allow_remote``, ``max_file_bytes``, ``overwrite``), retries for transient
failures (a failed run leaves no manifest, so a retry finishes it cleanly), and the summary as a
markdown artifact. An ``out`` that already holds a dataset is refused (immutable) without retries:
schedule each run into its own folder, or pass ``overwrite``.

A run that wrote a dataset emits the event ``cascade.dataset.created`` (resource
``cascade.dataset.<version>``; payload: version, out, counts): ``prefect.yaml`` triggers the
nightly retrain on it, so new raw data that lands through this flow is trained on without
waiting for 03:00.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from diffusion_core.data.ingest import IngestConfig, IngestResult, ingest
from diffusion_core.storage import redact
from flows.retry import retry_if_transient


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_if_transient)
def run_ingest(cfg: IngestConfig) -> dict[str, Any]:
    logger = get_run_logger()
    last = [0]

    def progress(p) -> None:
        if p.read - last[0] >= 10_000:
            last[0] = p.read
            logger.info("read %d, accepted %d, rejected %d", p.read, p.accepted, p.rejected)

    result = ingest(cfg, progress=progress)
    logger.info(
        "dataset %s: %d accepted, %d rejected, %d shards in %.1f s",
        result.dataset_version[:16],
        result.accepted,
        result.rejected,
        len(result.shards),
        result.seconds,
    )
    return asdict(result)


def summary_markdown(result: IngestResult | dict[str, Any]) -> str:
    r = asdict(result) if isinstance(result, IngestResult) else result
    lines = [
        f"# Ingest → `{r['out']}`",
        "",
        f"Dataset version: `{r['dataset_version']}`",
        "",
        "| count | value |",
        "|---|---:|",
        f"| read | {r['read']} |",
        f"| accepted | {r['accepted']} |",
        f"| rejected | {r['rejected']} |",
    ]
    lines += [f"| rejected: {k} | {v} |" for k, v in r["rejected_by_reason"].items()]
    lines += [f"| shards | {len(r['shards'])} |", f"| seconds | {r['seconds']:.1f} |"]
    return "\n".join(lines) + "\n"


@task
def publish_summary(result: dict[str, Any]) -> None:
    create_markdown_artifact(
        markdown=summary_markdown(result),
        key="ingest-summary",
        description=f"ingest of {result['read']} inputs into {result['out']}",
    )


DATASET_CREATED = "cascade.dataset.created"


def dataset_event(result: dict[str, Any]) -> dict[str, Any]:
    """The ``emit_event`` arguments announcing a new dataset version (no credentials: the
    locations are redacted)."""
    return {
        "event": DATASET_CREATED,
        "resource": {
            "prefect.resource.id": f"cascade.dataset.{result['dataset_version'][:16]}",
            "prefect.resource.name": redact(str(result["out"])) or "",
        },
        "payload": {
            "version": result["dataset_version"],
            "out": redact(str(result["out"])),
            "accepted": result["accepted"],
            "rejected": result["rejected"],
            "eval": result.get("eval", 0),
        },
    }


@flow(name="ingest", log_prints=True)
def ingest_flow(params: IngestConfig) -> dict[str, Any]:
    """Ingest raw data into webdataset shards; returns the run's counts and dataset version."""
    result = run_ingest(params)
    publish_summary(result)
    emit_event(**dataset_event(result))
    return result


if __name__ == "__main__":  # pragma: no cover
    import sys

    ingest_flow(IngestConfig(sources=sys.argv[1:-1], out=sys.argv[-1]))
