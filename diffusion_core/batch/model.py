"""Which model a batch job samples: a cascade folder, or a registry version resolved once.

``models:/name@alias`` is resolved to ``models:/name/<version>`` at the start of the job and the
job uses that version throughout: a champion moved while the job runs does not mix two models in
one output. The version's artifacts are downloaded once into the output folder
(``.model/<name>-v<version>/``) and every actor loads the cascade from there. A cascade folder
on an object store (``s3://bucket/cascade``) is fetched the same way, once, into
``.model/cascades/<identity>/`` (:func:`diffusion_core.cascade.fetch.local_cascade`: verified,
atomic, reused while the export is unchanged).
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from diffusion_core.cascade.config import CASCADE_JSON
from diffusion_core.storage import is_uri, redact

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class ModelError(ValueError):
    """The model cannot be used: unknown, unreachable, or not a cascade."""


class ResolvedModel(BaseModel):
    """The model of a job, pinned: name + version for a registry model, the folder otherwise."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str  # what the job samples: a folder, or models:/name/<version>
    requested: str  # what the user asked for (an alias URI, a version URI, a folder)
    name: str | None = None
    version: str | None = None
    local_dir: str  # the cascade folder the actors load


def _find_cascade(root: Path) -> Path:
    if (root / CASCADE_JSON).is_file():
        return root
    found = sorted(p.parent for p in root.rglob(CASCADE_JSON))
    if not found:
        raise ModelError(f"{root} holds no {CASCADE_JSON}: not a cascade (or a model without one)")
    return found[0]


def _probe(tracking_uri: str, where: str | None) -> None:
    """Fail in seconds when an MLflow server does not answer (its client retries for minutes)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    from diffusion_core.storage import strip_credentials

    try:
        urllib.request.urlopen(strip_credentials(tracking_uri)[0].rstrip("/") + "/health", timeout=5)
    except urllib.error.HTTPError:
        return  # it answers (auth or routing is the client's business)
    except (urllib.error.URLError, OSError) as e:
        raise ModelError(f"cannot reach the MLflow registry at {where}: {e}") from None


def resolve_model(
    model: str, download_root: str | Path, tracking_uri: str | None = None
) -> ResolvedModel:
    """Pin ``model`` (see the module docstring); fails fast with what to do. ``tracking_uri``:
    the registry (default: ``$MLFLOW_TRACKING_URI`` / MLflow's own default)."""
    m = _MODELS_URI.match(model)
    if m is None:
        if model.startswith("models:"):
            raise ModelError(
                f"model {model!r}: give a cascade folder or models:/NAME@ALIAS or models:/NAME/N"
            )
        if is_uri(model):  # a cascade folder on an object store: fetched into the cache
            from diffusion_core.cascade.fetch import local_cascade

            try:
                local = local_cascade(model, cache_dir=Path(download_root) / "cascades")
            except (FileNotFoundError, ValueError) as e:
                raise ModelError(f"model {redact(model)!r}: {e}") from None
            except OSError as e:  # unreachable store, wrong credentials
                where = f"{redact(model)}: {type(e).__name__}: {e}"
                raise ModelError(f"cannot read the model {where}") from None
            return ResolvedModel(uri=model, requested=model, local_dir=str(local))
        path = Path(model).expanduser().resolve()
        if not path.is_dir():
            raise ModelError(f"model folder {model!r} does not exist")
        return ResolvedModel(uri=str(path), requested=model, local_dir=str(_find_cascade(path)))
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, alias, version = m.group("name"), m.group("alias"), m.group("version")
    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    where = redact(tracking_uri)
    _probe(tracking_uri, where)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)  # not a global registry
    try:
        mv = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, version)
        )
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise ModelError(f"model {model!r} not found in the registry at {where}: {e.message}") from None
        raise ModelError(f"the MLflow registry at {where} failed: {e.message}") from None
    except Exception as e:  # noqa: BLE001 - connection refused, DNS, timeouts: say where
        raise ModelError(f"cannot reach the MLflow registry at {where}: {type(e).__name__}: {e}") from None
    pinned = f"models:/{name}/{mv.version}"
    target = Path(download_root) / f"{name}-v{mv.version}"
    if not target.is_dir() or not any(target.rglob(CASCADE_JSON)):
        import shutil
        import tempfile

        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            source = client.get_model_version_download_uri(name, str(mv.version))
            mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=str(staging), tracking_uri=tracking_uri
            )
            _find_cascade(staging)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)  # the folder appears whole or not at all
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return ResolvedModel(
        uri=pinned,
        requested=model,
        name=name,
        version=str(mv.version),
        local_dir=str(_find_cascade(target)),
    )
