"""The batch-sampling flow ``sample-batch``: prompts → images with a pinned model (docs/batch.md).

A thin Prefect 3 flow over :func:`diffusion_core.batch.run_batch`: typed parameters (the pydantic
:class:`~diffusion_core.batch.BatchConfig`), the one retry policy (a retried job resumes: images
already written are not sampled again), and two artifacts: a markdown summary (counts, model
version, images/s) and a table of the first rows of the manifest.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from diffusion_core.batch import BatchConfig, BatchResult, run_batch
from flows.retry import retry_if_transient


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_if_transient)
def run_batch_task(cfg: BatchConfig) -> dict[str, Any]:
    logger = get_run_logger()
    last = [0]

    def progress(stage: str, done: int, total: int | None) -> None:
        if stage == "sample" and (done - last[0] >= 100 or done == total):
            last[0] = done
            logger.info("sampled %d/%s images", done, total)

    result = run_batch(cfg, progress=progress)
    logger.info(
        "%s: %d images (%d written, %d already there), %d rows rejected, %.2f images/s",
        result.model["uri"],
        result.images,
        result.written,
        result.resumed,
        result.rejected,
        result.images_per_s,
    )
    return asdict(result)


def summary_markdown(r: BatchResult | dict[str, Any]) -> str:
    r = asdict(r) if isinstance(r, BatchResult) else r
    m = r["model"]
    model = f"`{m['name']}` version {m['version']}" if m.get("version") else f"`{m['uri']}`"
    lines = [
        f"# Batch sampling → `{r['out']}`",
        "",
        f"Model: {model} (asked for `{m['requested']}`)",
        "",
        "| count | value |",
        "|---|---:|",
        f"| prompt rows read | {r['read']} |",
        f"| accepted | {r['accepted']} |",
        f"| rejected | {r['rejected']} |",
    ]
    lines += [f"| rejected: {k} | {v} |" for k, v in r["rejected_by_reason"].items()]
    lines += [
        f"| images | {r['images']} |",
        f"| written now | {r['written']} |",
        f"| already there (resumed) | {r['resumed']} |",
        f"| images/s | {r['images_per_s']:.2f} |",
        f"| seconds | {r['seconds']:.1f} |",
    ]
    return "\n".join(lines) + "\n"


@task
def publish(result: dict[str, Any], rows: int = 10) -> None:
    import pyarrow.parquet as pq

    from diffusion_core.batch.output import Output

    create_markdown_artifact(
        markdown=summary_markdown(result),
        key="sample-batch-summary",
        description=f"batch sampling into {result['out']}",
    )
    with Output(result["out"]).open_read("manifest.parquet") as f:  # a folder or a URI
        table = pq.read_table(f, columns=["id", "prompt", "seed", "file", "member", "sha256"])
    first = table.slice(0, rows).to_pylist()
    create_table_artifact(table=first, key="sample-batch-rows", description="the first images")


@flow(name="sample-batch", log_prints=True)
def sample_batch_flow(params: BatchConfig) -> dict[str, Any]:
    """Sample the prompts with the model (an alias is pinned to one version at the start)."""
    result = run_batch_task(params)
    publish(result)
    return result


if __name__ == "__main__":  # pragma: no cover
    import sys

    sample_batch_flow(BatchConfig(model=sys.argv[1], prompts=sys.argv[2:-1], out=sys.argv[-1]))
