"""Sampling from a noise predictor: ancestral (DDPM), DDIM, DPM-Solver++ and UniPC, with guidance.

Chapter 18 of Prince, *Understanding Deep Learning*, sections 18.3, 18.5.2 and 18.6.2-18.6.3.

One concept per module:

- :mod:`.model`: the callables a sampler takes (:data:`EpsModel`, :data:`GradLogProb`,
  :data:`Callback`). A model is any ``model(z_t, t, **model_kwargs) -> eps_hat`` with ``t`` a
  LongTensor ``[B]`` of timesteps in ``{0, ..., T-1}`` (index ``t`` is the chapter's step
  ``t+1``), returning the noise estimate g_t[z_t] of eq. 18.35 shaped like ``z_t``; a model that
  also learns its variance returns ``[eps, v]`` along dim 1.
- :mod:`.timesteps`: step selection (:func:`timesteps_for`, :data:`SPACINGS`) and the respaced
  schedule over the visited steps (18.6.2).
- :mod:`.steps`: the update rules of DDPM (eqs. 18.16, 18.35), DDIM, DPM-Solver++ (2M, 3M) and
  UniPC (predictor and corrector) as pure functions of the schedule and the model's prediction
  (:data:`VARIANCES`).
- :mod:`.guidance`: classifier guidance (eq. 18.40 and its noise form, :func:`classifier_grad`)
  and :func:`classifier_free_guidance`.
- :mod:`.noise`: Gaussian noise drawn on the generator's device and moved to the data's, so a
  CPU ``torch.Generator`` drives a CUDA model.
- :mod:`.driver`: the one loop all samplers run.
- :mod:`.samplers`: :func:`run_sampler` (from given noise, dispatching on ``method``),
  :func:`sample` (draws z_T first) and the fixed-method faces :func:`sample_ddpm`,
  :func:`sample_ddim`, :func:`sample_dpmsolver_pp`, :func:`sample_unipc` (k-diffusion style,
  ``sample_*(model, z, schedule, steps)``).

Reserved keyword names (the samplers' own options, so not usable as model kwargs): ``method``,
``steps``, ``timesteps``, ``spacing``, ``eta``, ``variance``, ``order``, ``clip_x``,
``decoder_noise``, ``grad_log_prob``, ``classifier_scale``, ``generator``, ``callback``,
``return_trajectory``, ``progress``, and for :func:`sample` also ``device``, ``dtype``.
"""

from diffusion_core.sampling.guidance import classifier_free_guidance, classifier_grad
from diffusion_core.sampling.model import Callback, EpsModel, GradLogProb
from diffusion_core.sampling.samplers import (
    DEFAULT_ORDER,
    DEFAULT_SPACING,
    METHODS,
    run_sampler,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmsolver_pp,
    sample_unipc,
)
from diffusion_core.sampling.steps import VARIANCES
from diffusion_core.sampling.timesteps import SPACINGS, timesteps_for

__all__ = [
    "DEFAULT_ORDER",
    "DEFAULT_SPACING",
    "METHODS",
    "SPACINGS",
    "VARIANCES",
    "Callback",
    "EpsModel",
    "GradLogProb",
    "classifier_free_guidance",
    "classifier_grad",
    "run_sampler",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmsolver_pp",
    "sample_unipc",
    "timesteps_for",
]
