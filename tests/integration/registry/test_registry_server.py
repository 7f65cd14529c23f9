"""Registration against a real `mlflow server` on loopback (started by the test session):
load and sample the champion, credentials kept out of the registry, the server killed in the
middle of a registration and a rerun, and `mlflow models serve` answering `/invocations`."""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.request

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from diffusion_core.registry import register
from tests.services import ModelServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARAMS = {"num_inference_steps": 5, "guidance_scale": 2.0, "sampler": "ddim"}


def _everything_recorded(client: MlflowClient, name: str) -> str:
    """Every tag, param and alias of the registered model, its versions and their runs."""
    rm = client.get_registered_model(name)
    parts = [json.dumps(rm.tags), json.dumps({k: str(v) for k, v in rm.aliases.items()})]
    for mv in client.search_model_versions(f"name = '{name}'"):
        parts.append(json.dumps(mv.tags) + str(mv.source))
        if mv.run_id:
            run = client.get_run(mv.run_id)
            parts += [json.dumps(run.data.tags), json.dumps(run.data.params)]
            parts += [str(d.dataset.source) for d in run.inputs.dataset_inputs]
    return "\n".join(parts)


def test_register_on_the_server_then_load_and_sample_the_champion(
    mlflow_server, make_cascade, make_report, data_dir, monkeypatch, capsys
):
    name = "server-model"
    host = mlflow_server.url.removeprefix("http://")
    secret_uri = f"http://alice:s3cret-pw@{host}"  # the server has no auth: the password is ignored
    messages: list[str] = []
    t = time.perf_counter()
    r = register(
        make_cascade(0),
        data_dir,
        name=name,
        report=make_report(0.3),
        tracking_uri=secret_uri,
        progress=lambda phase, m: messages.append(m),
    )
    seconds = time.perf_counter() - t
    assert r.version == "1" and r.promoted and r.aliases == ["challenger", "champion"]
    client = MlflowClient(mlflow_server.url)
    recorded = _everything_recorded(client, name)
    assert "s3cret-pw" not in recorded and "s3cret-pw" not in json.dumps(r.summary())
    assert "s3cret-pw" not in "\n".join(messages) and "alice:***@" in messages[0]
    assert "s3cret-pw" not in capsys.readouterr().err

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_tracking_uri(mlflow_server.url)
    t = time.perf_counter()
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    out = model.predict(pd.DataFrame({"prompt": ["a red circle"], "seed": [4]}), params=PARAMS)
    predict_s = time.perf_counter() - t
    assert Image.open(io.BytesIO(out["image"][0])).size == (16, 16)
    print(f"\nregister {seconds:.2f} s, load {load_s:.2f} s, predict {predict_s:.2f} s")


def test_the_server_killed_mid_registration_then_a_rerun_completes_it(
    mlflow_server, make_cascade, make_report, data_dir, monkeypatch
):
    name = "interrupted"
    uri = mlflow_server.url
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once, not after minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    client = MlflowClient(uri)

    def kill_at(phase):
        def progress(p, message):
            if p == phase:
                mlflow_server.kill()

        return progress

    # 1. gone right after the upload, before the version exists: no version at all
    with pytest.raises(MlflowException):
        register(
            make_cascade(0), data_dir, name=name, report=make_report(0.3), tracking_uri=uri,
            progress=kill_at("logged"),
        )  # fmt: skip
    mlflow_server.restart()
    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST|not found"):
        client.get_registered_model(name)
    r = register(make_cascade(0), data_dir, name=name, report=make_report(0.3), tracking_uri=uri)
    assert (r.version, r.status, r.promoted) == ("1", "registered", True)

    # 2. gone right after the version was created, before the gate: the rerun finishes it
    with pytest.raises(MlflowException):
        register(
            make_cascade(1), data_dir, name=name, report=make_report(0.2), tracking_uri=uri,
            progress=kill_at("registered"),
        )  # fmt: skip
    mlflow_server.restart()
    assert "registration" not in client.get_model_version(name, "2").tags
    r = register(make_cascade(1), data_dir, name=name, report=make_report(0.2), tracking_uri=uri)
    assert (r.version, r.status, r.promoted) == ("2", "completed", True)
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    assert {k: str(v) for k, v in client.get_registered_model(name).aliases.items()} == {
        "champion": "2",
        "challenger": "2",
    }
    runs = client.search_runs(
        [client.get_experiment_by_name("cascade-registry").experiment_id],
        "tags.registered_model = 'interrupted'",
    )
    assert "RUNNING" not in {run.info.status for run in runs}  # the killed attempts are closed
    # every version has its files: both load
    mlflow.set_tracking_uri(uri)
    for v in ("1", "2"):
        assert mlflow.pyfunc.load_model(f"models:/{name}/{v}") is not None


def test_mlflow_models_serve_answers_invocations_with_base64_pngs(
    mlflow_server, make_cascade, make_report, data_dir, tmp_path
):
    name = "served"
    register(
        make_cascade(2),
        data_dir,
        name=name,
        report=make_report(0.3),
        tracking_uri=mlflow_server.url,
    )
    mlflow.set_tracking_uri(mlflow_server.url)
    local = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    df = pd.DataFrame({"prompt": ["a red circle", "two blue squares"], "seed": [11, 12]})
    expected = local.predict(df, params=PARAMS)

    server = ModelServer(tmp_path, f"models:/{name}@champion", mlflow_server.url)
    with server:
        body = json.dumps(
            {"dataframe_split": df.to_dict(orient="split", index=False), "params": PARAMS}
        ).encode()
        request = urllib.request.Request(
            server.url + "/invocations", body, {"Content-Type": "application/json"}
        )
        t = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        request_s = time.perf_counter() - t
        bad = urllib.request.Request(
            server.url + "/invocations",
            json.dumps(
                {"dataframe_records": [{"prompt": "a"}], "params": {"sampler": "x"}}
            ).encode(),
            {"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=60)
        assert err.value.code == 400 and "sampler must be one of" in err.value.read().decode()
    rows = answer["predictions"]
    assert [row["seed"] for row in rows] == [11, 12]
    images = [base64.b64decode(row["image"]) for row in rows]
    assert images == list(expected["image"])  # the same bytes over REST as in process
    assert Image.open(io.BytesIO(images[0])).size == (16, 16)
    print(f"\nmodels serve healthy in {server.started_in:.1f} s, request {request_s:.2f} s")
