"""The one loop every sampler runs: visit the steps, call the model, guide, predict x, step.

For each visited index ``i`` (from the noisiest down to 0) :func:`drive`

1. calls the model once at the visited timestep (:func:`~.model.predict_eps`),
2. applies classifier guidance in noise form, for the methods that take it so
   (:func:`~.guidance.guide_eps`),
3. predicts the data x_hat, with clipping (:func:`~.steps.predict_x`),
4. asks the method's update rule (:mod:`~.steps`) for the :class:`~.steps.Transition` to ``i-1``,
   shifts its mean by classifier guidance if the method takes it so (eq. 18.40,
   :func:`~.guidance.guide_mean`), and draws from it: no noise where the variance is 0 or on the
   last step to the data (Algorithm 18.2 returns the mean f_1; ``noise_last`` draws it too),
5. reports the step to the callback and the trajectory (and a progress bar).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from diffusion_core.sampling.guidance import ClassifierGuidance, guide_eps, guide_mean
from diffusion_core.sampling.model import Callback, EpsModel, predict_eps
from diffusion_core.sampling.noise import randn_like
from diffusion_core.sampling.steps import Transition, predict_x
from diffusion_core.schedule import NoiseSchedule

Tensor = torch.Tensor


@dataclass(frozen=True)
class Visit:
    """What the loop knows at visited index ``i`` when it calls the method's update rule.

    ``schedule`` is the respaced schedule, ``z`` the state z_t (after the method's corrector, if
    it has one), ``eps`` the (guided, clipped) noise estimate, ``v`` the learned-variance output
    or ``None``, ``x_hat`` the data prediction, ``history`` the data predictions of the previous
    visits (indices ``i+1, i+2, ...``, most recent first, at most :data:`HISTORY`), ``z_last``
    the state the previous step started from (``None`` at the first visit).
    """

    schedule: NoiseSchedule
    i: int
    z: Tensor
    eps: Tensor
    v: Tensor | None
    x_hat: Tensor
    history: tuple[Tensor, ...] = ()
    z_last: Tensor | None = None

    @property
    def x_prev(self) -> Tensor | None:
        """The data prediction of the previous visit (``None`` at the first)."""
        return self.history[0] if self.history else None


HISTORY = 3
"""Data predictions the loop keeps for the multistep rules (third order needs two)."""


StepRule = Callable[[Visit], Transition]
"""A method's update rule bound to its options, e.g. ``lambda s: ddim_step(s.schedule, ...)``."""
Corrector = Callable[[Visit], Tensor]
"""A predictor-corrector method's corrector: the visited state corrected with the model call just
made there (UniC of UniPC); the loop then steps from the corrected state."""


@torch.no_grad()
def drive(
    model: EpsModel,
    z: Tensor,
    timesteps: Tensor,
    schedule: NoiseSchedule,
    step: StepRule,
    *,
    name: str,
    guidance: ClassifierGuidance | None = None,
    clip_x: float | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
    model_kwargs: Mapping[str, Any],
    correct: Corrector | None = None,
    noise_last: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Run ``step`` over the visited ``timesteps`` (increasing) from the noise ``z``.

    ``schedule`` is the schedule respaced to ``timesteps`` (:func:`~.timesteps.respaced`), so
    index ``i`` of it is timestep ``timesteps[i]`` of the model. ``generator`` draws the noise of
    stochastic steps (:mod:`~.noise`: it may live on another device than ``z``); ``name`` labels
    the progress bar. ``correct`` (predictor-corrector methods) replaces each visited state after
    the first by its correction before the step (the trajectory keeps the predicted states).
    ``noise_last`` draws the last step's noise too (a sample of the decoder, not its mean).
    Returns the final state, and with ``return_trajectory`` also the states ``[S+1, *z.shape]``,
    ``z`` first and the sample last.
    """
    trajectory = [z] if return_trajectory else None
    history: tuple[Tensor, ...] = ()
    z_last: Tensor | None = None
    for n, i in enumerate(_descending(len(timesteps), progress, name)):
        eps, v, t = predict_eps(model, z, int(timesteps[i]), model_kwargs)
        if guidance is not None:
            grad = guidance.grad_log_prob(z, t, **model_kwargs)
            if not guidance.on_mean:
                eps = guide_eps(schedule, i, eps, guidance.scale, grad)
        x_hat, eps = predict_x(schedule, z, i, eps, clip_x)
        visit = Visit(schedule, i, z, eps, v, x_hat, history, z_last)
        if correct is not None and z_last is not None:
            visit = replace(visit, z=correct(visit))
        mean, variance = step(visit)
        if guidance is not None and guidance.on_mean:
            mean = guide_mean(mean, variance, guidance.scale, grad)
        z_last, history = visit.z, (x_hat, *history)[:HISTORY]
        z = _draw(mean, variance, i > 0 or noise_last, z, generator)
        if callback is not None:
            callback({"i": n, "t": int(t[0]), "z": z, "x_hat": x_hat})
        if trajectory is not None:
            trajectory.append(z)
    return z if trajectory is None else (z, torch.stack(trajectory))


def _draw(
    mean: Tensor,
    variance: Tensor | float,
    noisy: bool,
    z: Tensor,
    generator: torch.Generator | None,
) -> Tensor:
    """A draw of Norm[mean, variance I]: the mean itself when deterministic or not ``noisy``."""
    if not noisy or (not isinstance(variance, Tensor) and variance == 0.0):
        return mean
    std = variance.sqrt() if isinstance(variance, Tensor) else variance**0.5
    return mean + std * randn_like(z, generator)


def _descending(n: int, progress: bool, name: str) -> Iterable[int]:
    """Indices n-1, ..., 0, with a progress bar if asked."""
    indices = range(n - 1, -1, -1)
    if not progress:
        return indices
    from rich.progress import track

    return track(indices, total=n, description=f"sampling ({name}, {n} steps)")
