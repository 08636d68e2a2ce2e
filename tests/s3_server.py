"""boto3 pointed at a real local S3 server (`benchmarks.local_s3`), and pytest fixtures.

The object-store code is tested against a real HTTP server process (never a mocked client);
`FaultProxy` sits between the two to cut connections on cue. Import the fixtures into a test
module to use them.
"""

import uuid

import boto3
import pytest

from benchmarks.local_s3 import FaultProxy, MotoServer, client_environment
from tfsplit.data import object_store


def point_boto3_at(monkeypatch, endpoint):
    """Points boto3 (and so `object_store`) at `endpoint` through the environment only; cached
    filesystems are dropped so that the next one resolves this endpoint."""
    settings, foreign = client_environment(endpoint)
    for name in foreign:
        monkeypatch.delenv(name, raising=False)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    object_store.clear_s3_filesystems()


def create_bucket(name=None):
    """Creates a bucket (a fresh unique name unless given) where boto3 points; returns its name."""
    name = name or f"tfsplit-test-{uuid.uuid4().hex[:12]}"
    boto3.session.Session().client("s3").create_bucket(Bucket=name)
    return name


# ----------------------------------------------------------------------------------------------
# Fixtures (import them into a test module).
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_server():
    """One moto server for the session: starting one takes a second or two."""
    with MotoServer() as server:
        yield server


@pytest.fixture
def s3_bucket(moto_server, monkeypatch):
    """A fresh bucket on the session's server, with boto3 pointed at it; yields its name."""
    point_boto3_at(monkeypatch, moto_server.endpoint)
    yield create_bucket()
    object_store.clear_s3_filesystems()


@pytest.fixture
def fault_proxy(moto_server, monkeypatch):
    """A `FaultProxy` in front of the session's server, with boto3 pointed at the proxy."""
    with FaultProxy(moto_server.port) as proxy:
        point_boto3_at(monkeypatch, proxy.endpoint)
        yield proxy
        object_store.clear_s3_filesystems()


@pytest.fixture
def own_moto_server(monkeypatch):
    """A moto server of this test alone (for tests that kill it), with boto3 pointed at it."""
    with MotoServer() as server:
        point_boto3_at(monkeypatch, server.endpoint)
        yield server
        object_store.clear_s3_filesystems()
