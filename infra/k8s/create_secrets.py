"""The Kubernetes Secrets the manifests reference, created without ever being written to disk.

    python infra/k8s/create_secrets.py                       # list the Secrets, keys and sources
    MLFLOW_DB_USER=... MLFLOW_DB_PASSWORD=... MLFLOW_S3_ACCESS_KEY_ID=... \\
    MLFLOW_S3_SECRET_ACCESS_KEY=... PREFECT_DB_USER=... PREFECT_DB_PASSWORD=... \\
        python infra/k8s/create_secrets.py --create --namespace cascade

``--create`` pipes the Secrets to ``kubectl create -f -`` (which refuses to overwrite existing
ones: the MLflow admin password only takes effect when MLflow's user store is first created, so
regenerating it later would lock the clients out). ``--stdout`` prints the manifests instead, for
a tool that encrypts them (e.g. ``| kubeseal``); nothing else prints a value.

Values are either generated here (``secrets.token_urlsafe``: the MLflow admin password and Flask
key, the Prefect auth string, the Ray token) or taken from the environment (what this project
does not own: the Postgres users, the S3 keys). No value has a default.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Value:
    """Where a key's value comes from: generated, an environment variable, a constant (not a
    credential), or the value of another key."""

    generate: str | None = None  # "token" | "hex" | "prefect-auth"
    env: str | None = None
    constant: str | None = None
    same_as: tuple[str, str] | None = None

    def describe(self) -> str:
        if self.generate:
            return f"generated ({self.generate})"
        if self.env:
            return f"from ${self.env}"
        if self.constant is not None:
            return f"constant {self.constant!r}"
        assert self.same_as is not None
        return f"same as {self.same_as[0]}/{self.same_as[1]}"


MLFLOW_ADMIN = "admin"  # MLFLOW_AUTH_ADMIN_USERNAME in mlflow.yaml

SECRETS: dict[str, dict[str, Value]] = {
    "cascade-mlflow-server": {
        "admin-password": Value(generate="token"),
        "flask-secret-key": Value(generate="token"),
    },
    # What the clients (Prefect worker, Ray pods) log in with. The admin by default; replace with
    # a user created through MLflow's auth API to give the jobs less than admin rights.
    "cascade-mlflow-client": {
        "username": Value(constant=MLFLOW_ADMIN),
        "password": Value(same_as=("cascade-mlflow-server", "admin-password")),
    },
    "cascade-mlflow-db": {
        "username": Value(env="MLFLOW_DB_USER"),
        "password": Value(env="MLFLOW_DB_PASSWORD"),
    },
    "cascade-mlflow-s3": {
        "access-key-id": Value(env="MLFLOW_S3_ACCESS_KEY_ID"),
        "secret-access-key": Value(env="MLFLOW_S3_SECRET_ACCESS_KEY"),
    },
    "cascade-prefect-db": {
        "username": Value(env="PREFECT_DB_USER"),
        "password": Value(env="PREFECT_DB_PASSWORD"),
    },
    "cascade-prefect-auth": {"auth-string": Value(generate="prefect-auth")},
    # KubeRay reads the key `auth_token` (RayCluster/RayJob spec.authOptions.secretName).
    "cascade-ray-auth": {"auth_token": Value(generate="hex")},
}


def _generated(kind: str) -> str:
    if kind == "token":
        return secrets.token_urlsafe(32)
    if kind == "hex":
        return secrets.token_hex(32)
    if kind == "prefect-auth":
        return f"cascade:{secrets.token_urlsafe(32)}"
    raise ValueError(f"unknown generator {kind!r}")


def missing_env(environ: dict[str, str] | None = None) -> list[str]:
    """The environment variables the Secrets need that are unset or empty."""
    environ = os.environ if environ is None else environ
    wanted = [v.env for keys in SECRETS.values() for v in keys.values() if v.env]
    return [name for name in wanted if not environ.get(name)]


def render(namespace: str, environ: dict[str, str] | None = None) -> dict:
    """A ``v1/List`` of the Secrets with their values (generated now, or from ``environ``)."""
    environ = os.environ if environ is None else environ
    if missing := missing_env(environ):
        raise SystemExit(f"set these environment variables first: {' '.join(missing)}")
    values: dict[tuple[str, str], str] = {}
    for name, keys in SECRETS.items():
        for key, v in keys.items():
            if v.generate:
                values[name, key] = _generated(v.generate)
            elif v.env:
                values[name, key] = environ[v.env]
            elif v.constant is not None:
                values[name, key] = v.constant
    for name, keys in SECRETS.items():
        for key, v in keys.items():
            if v.same_as:
                values[name, key] = values[v.same_as]
    items = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/part-of": "cascade-diffusion"},
            },
            "type": "Opaque",
            "stringData": {key: values[name, key] for key in keys},
        }
        for name, keys in SECRETS.items()
    ]
    return {"apiVersion": "v1", "kind": "List", "items": items}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--namespace", default="cascade", help="Namespace of the Secrets.")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--create", action="store_true", help="kubectl create them.")
    what.add_argument("--stdout", action="store_true", help="Print the manifests (with values).")
    args = p.parse_args(argv)
    if not (args.create or args.stdout):
        for name, keys in SECRETS.items():
            for key, v in keys.items():
                print(f"{name:<24} {key:<18} {v.describe()}")
        if missing := missing_env():
            print(f"\n--create needs: {' '.join(missing)}")
        return 0
    doc = json.dumps(render(args.namespace))
    if args.stdout:
        print(doc)
        return 0
    done = subprocess.run(
        ["kubectl", "create", "--namespace", args.namespace, "-f", "-"], input=doc, text=True
    )
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
