"""The model registry: the MLflow pyfunc model (from code), registration, aliases, the gate.

``model.py`` the pyfunc model (this file is what MLflow logs: no pickle); ``gate.py`` the
promotion decision (pure); ``registration.py`` :func:`register` / :func:`promote` against an
MLflow tracking server or a local sqlite store; ``cli.py`` ``cascade register`` and
``cascade promote``. ``docs/registry.md`` is the contract for consumers.
"""

from diffusion_core.registry.gate import GateConfig, GateDecision, decide
from diffusion_core.registry.registration import (
    CHALLENGER,
    CHAMPION,
    REGISTERED_MODEL,
    RegistrationResult,
    RegistryError,
    champion_lineage,
    content_hash,
    promote,
    register,
)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "REGISTERED_MODEL",
    "GateConfig",
    "GateDecision",
    "RegistrationResult",
    "RegistryError",
    "champion_lineage",
    "content_hash",
    "decide",
    "promote",
    "register",
]
