"""Evaluation of a trained cascade on a dataset's held-out split (``docs/evaluation.md``).

:func:`evaluate` → :class:`EvalReport` (``report.py``, what the registry's gate compares):
FID / KID against the held-out images with the offline Inception-v3 (``inception.py``,
``fid.py``, reference features cached per dataset version in ``reference.py``), each stage's NLL
bound in bits/dim (``nll.py``), the shapes checker's faithfulness (``faithfulness.py``), sample
grids (``grids.py``), the held-out split's reader and the demo's held-out captions
(``heldout.py``); ``cli.py`` is ``cascade evaluate``. Heavy imports (torchmetrics, the
Inception weights, the training reader) happen inside the functions that need them.
"""

from diffusion_core.evaluation.evaluator import METRICS, evaluate
from diffusion_core.evaluation.report import EvalReport, EvalSettings

__all__ = ["METRICS", "EvalReport", "EvalSettings", "evaluate"]
