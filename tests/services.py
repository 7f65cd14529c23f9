"""Test-only servers, on the project's one process helper (:class:`infra.local.services.Server`).

``mlflow server`` itself is started the one way the project has
(:class:`infra.local.services.MlflowServer`, the command of ``services.py up``); here is only what
no script starts:

- :class:`ModelServer`: ``mlflow models serve -m URI --env-manager local`` on 127.0.0.1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from infra.local.services import Server


class ModelServer(Server):
    """``mlflow models serve -m MODEL_URI --env-manager local`` against ``tracking_uri``."""

    health_path = "/ping"

    def __init__(self, root: Path, model_uri: str, tracking_uri: str, port: int | None = None):
        super().__init__("model-server", root, port)
        self.model_uri = model_uri
        self.tracking_uri = tracking_uri

    def command(self) -> list[str]:
        return [
            str(Path(sys.executable).parent / "mlflow"),
            "models", "serve", "-m", self.model_uri, "--env-manager", "local",
            "-h", "127.0.0.1", "-p", str(self.port), "-w", "1",
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        return {
            **super().env(),
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
        }
