"""The deployment sketch in deploy/: the Kubernetes manifests are valid against Kubernetes' own
schemas, the training server's container commands parse, and the server's image builds and starts
where a Docker daemon can build it."""

import json
import pathlib
import re
import subprocess
import time

import kubernetes_validate
import pytest
import yaml
from test_readme import flag_errors

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
IMAGE_ROOT = "/opt/tfsplit/"  # where the server's image holds the repository's files


def documents(path):
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_the_manifests_are_valid_kubernetes_objects(path):
    kinds = []
    for document in documents(path):
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)
        kinds.append(document["kind"])
    assert "Deployment" in kinds and "Service" in kinds


def _server_commands():
    """The training server's argv in its Dockerfile's CMD and in its Kubernetes Deployment, with
    the image's paths mapped onto this clone."""
    dockerfile = (DEPLOY / "train-server.Dockerfile").read_text()
    cmd = re.search(r"^CMD (\[.*?\])$", dockerfile.replace("\\\n", ""), flags=re.M | re.S)
    deployment = next(
        d
        for d in documents(DEPLOY / "kubernetes" / "train-server.yaml")
        if d["kind"] == "Deployment"
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert 'ENTRYPOINT ["tfsplit-train-server"]' in dockerfile
    return [
        ["tfsplit-train-server"] + [a.replace(IMAGE_ROOT, f"{ROOT}/") for a in args]
        for args in (json.loads(cmd.group(1)), container["args"])
    ]


def test_the_training_servers_container_commands_parse():
    commands = _server_commands()
    assert flag_errors(commands) == [None] * len(commands)


def test_the_training_servers_image_builds_and_starts():
    """Needs a Docker daemon that can pull python:3.11-slim and reach the package index."""
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.skip("no Docker daemon on this machine: the images are not built here")
    tag = "tfsplit-train-server:test"
    build = subprocess.run(
        ["docker", "build", "-f", str(DEPLOY / "train-server.Dockerfile"), "-t", tag, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    args = ["--config=/opt/tfsplit/configs/deprune.py", "--workdir=/tmp/run", "--port=50051"]
    started = subprocess.run(
        ["docker", "run", "-d", tag, *args], capture_output=True, text=True, timeout=120
    )
    assert started.returncode == 0, started.stderr[-3000:]
    container = started.stdout.strip()
    try:
        deadline, logs = time.monotonic() + 300, ""
        while "listening on 127.0.0.1:50051" not in logs and time.monotonic() < deadline:
            time.sleep(2)
            logs = subprocess.run(
                ["docker", "logs", container], capture_output=True, text=True, timeout=60
            ).stdout
        assert "listening on 127.0.0.1:50051" in logs, logs[-3000:]
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True, timeout=120)
