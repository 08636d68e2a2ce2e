"""Tests of tfsplit-serve's token and TLS, through the device's clients (tfsplit.device).

A token server (plain TCP) checks that a call without the token, or with another, is refused on
both protocols before it reaches the model, and that the right token is served; a TLS server
(with the token too, as deployed) checks that clients holding the CA are served and plain-text or
untrusting ones are not. The pairs are self-signed certificates for 127.0.0.1 made with the
openssl CLI, as the README's test pair; the tail is the tiny SavedModel of serving_fixtures.
"""

import contextlib
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys

import grpc
import numpy as np
import pytest
import serving_fixtures as fx  # imports tfsplit (Keras 2) before TensorFlow loads
from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc

from tfsplit import device
from tfsplit.auth import credentials
from tfsplit.serving import TailServer, rest

MODEL = "tail"
DTYPE = "int8"
TOKEN = "s3cret-Token_1"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOCOLS = ("grpc", "rest")


def _make_pair(directory, name):
    key, cert = os.path.join(directory, f"{name}.key"), os.path.join(directory, f"{name}.crt")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", key, "-out", cert,
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Model base, token file and two TLS pairs (the server's and a stranger's)."""
    tmp = str(tmp_path_factory.mktemp("security"))
    fx.build_tail_saved_model(tmp, MODEL, DTYPE)
    token_file = os.path.join(tmp, "token")
    with open(token_file, "w") as f:
        f.write(f"  {TOKEN}\n")
    cert, key = _make_pair(tmp, "server")
    other_cert, other_key = _make_pair(tmp, "other")
    return {
        "base": tmp,
        "token_file": token_file,
        "cert": cert,
        "key": key,
        "other_cert": other_cert,
        "other_key": other_key,
    }


def _count_predicts(server):
    """Counts the calls that reach the model: a refused call must not be one."""
    calls = []
    predict = server.served.predict

    def counted(*args, **kwargs):
        calls.append(1)
        return predict(*args, **kwargs)

    server.served.predict = counted
    return calls


@pytest.fixture(scope="module")
def token_server(files):
    token = credentials.read_token_file(files["token_file"])
    with TailServer(files["base"], MODEL, token=token) as server:
        yield server, _count_predicts(server)


@pytest.fixture(scope="module")
def tls_server(files):
    server = TailServer(
        files["base"], MODEL, token=TOKEN, tls_cert_file=files["cert"], tls_key_file=files["key"]
    )
    with server:
        yield server


def _address(server, protocol):
    return server.grpc_target if protocol == "grpc" else server.rest_url


def _check_served(client, seed=0):
    payload = fx.make_payload(DTYPE, batch=2, seed=seed)
    got = client.predict(fx.wire(payload))
    np.testing.assert_allclose(got, fx.reference_probabilities(payload), atol=1e-5)


def _refusal(client):
    with pytest.raises(device.ServingError) as raised:
        client.predict(fx.wire(fx.make_payload(DTYPE)))
    return raised.value


# --- the token ------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_calls_without_the_right_token_are_refused_and_reach_nothing(token_server, protocol):
    server, calls = token_server
    address = _address(server, protocol)
    for token in (None, "wrong", TOKEN + "x"):
        before = len(calls)
        with contextlib.closing(device.make_client(protocol, address, MODEL, 10, token=token)) as c:
            error = _refusal(c)
        if protocol == "grpc":
            assert error.code == "UNAUTHENTICATED", error
        else:
            assert error.http_status == 401 and "token" in error.message, error
        assert len(calls) == before  # refused before the model
    with contextlib.closing(device.make_client(protocol, address, MODEL, 10, token=TOKEN)) as c:
        _check_served(c)
        _check_served(c, seed=1)  # the same connection, again
    assert len(calls) >= 2


def _http(server, method, path, body=None, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        connection.close()


def test_rest_refusal_is_401_json_with_a_bearer_challenge(token_server):
    server, calls = token_server
    before = len(calls)
    predict, status = f"/v1/models/{MODEL}:predict", f"/v1/models/{MODEL}"
    # Not even JSON: the token is checked before the body is read.
    got, headers, answer = _http(server, "POST", predict, b"not json")
    assert got == 401 and list(answer) == ["error"] and "Bearer" in answer["error"]
    assert headers["WWW-Authenticate"] == 'Bearer realm="tfsplit-serve"'
    assert headers["Content-Type"] == "application/json"
    wrong = {"Authorization": "Bearer wrong"}
    got, headers, _ = _http(server, "POST", predict, b"not json", wrong)
    assert got == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]
    for sent in ({}, wrong, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
        assert _http(server, "GET", status, headers=sent)[0] == 401, sent
    assert _http(server, "GET", f"{status}/metadata")[0] == 401
    assert len(calls) == before
    for scheme in ("Bearer", "bearer"):  # the scheme is case-insensitive in HTTP
        got, _, answer = _http(
            server, "GET", status, headers={"Authorization": f"{scheme} {TOKEN}"}
        )
        assert got == 200 and answer["model_version_status"][0]["state"] == "AVAILABLE"
    got, _, answer = _http(
        server, "POST", predict, b"not json", {"Authorization": f"Bearer {TOKEN}"}
    )
    assert got == 400 and "Malformed JSON" in answer["error"]  # past the token, validated


def test_grpc_metadata_call_is_refused_too(token_server):
    server, _ = token_server
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = MODEL
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.GetModelMetadata(request, timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = stub.GetModelMetadata(
            request, timeout=10, metadata=credentials.call_metadata(TOKEN)
        )
    assert answer.model_spec.name == MODEL


# --- TLS ------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tls_clients_with_the_ca_are_served_and_others_are_not(files, tls_server, protocol):
    ca = credentials.read_pem(files["cert"], "TLS CA")
    stranger = credentials.read_pem(files["other_cert"], "TLS CA")
    address = _address(tls_server, protocol)
    if protocol == "rest":
        assert address.startswith("https://127.0.0.1:")
        plain = address.replace("https://", "http://")
    else:
        plain = address
    untrusting = [
        device.make_client(protocol, plain, MODEL, 5, token=TOKEN),  # plain text
        device.make_client(protocol, address, MODEL, 5, token=TOKEN, root_certificates=stranger),
    ]
    if protocol == "rest":  # https against the system's CAs, which never signed a test pair
        untrusting.append(device.make_client(protocol, address, MODEL, 5, token=TOKEN))
    for client in untrusting:
        with contextlib.closing(client):
            assert _refusal(client).code == "UNAVAILABLE"
    trusting = device.make_client(protocol, address, MODEL, 10, token=TOKEN, root_certificates=ca)
    with contextlib.closing(trusting):
        _check_served(trusting)
    no_token = device.make_client(protocol, address, MODEL, 10, root_certificates=ca)
    with contextlib.closing(no_token):
        error = _refusal(no_token)
    assert error.code == "UNAUTHENTICATED" or error.http_status == 401


def test_a_silent_connection_does_not_hold_up_the_tls_server(files, tls_server):
    ca = credentials.read_pem(files["cert"], "TLS CA")
    with socket.create_connection(("127.0.0.1", tls_server.rest_port), timeout=5):
        # This connection never starts its handshake; others must still be served.
        client = device.make_client(
            "rest", tls_server.rest_url, MODEL, 5, token=TOKEN, root_certificates=ca
        )
        with contextlib.closing(client):
            _check_served(client, seed=2)


def test_tls_context_is_tls12_or_newer_and_checks_the_pair(files, tmp_path):
    context = rest.tls_context(files["cert"], files["key"])
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    with pytest.raises(ValueError, match="do not make a pair"):
        rest.tls_context(files["cert"], files["other_key"])
    encrypted = str(tmp_path / "encrypted.key")
    command = ["openssl", "pkey", "-aes256", "-passout", "pass:x", "-in", files["key"]]
    subprocess.run([*command, "-out", encrypted], check=True, capture_output=True, timeout=60)
    with pytest.raises(ValueError, match="encrypted"):  # never a passphrase prompt
        rest.tls_context(files["cert"], encrypted)


def test_bad_security_arguments_fail_before_the_model_loads(files, tmp_path):
    missing_model = str(tmp_path / "no_model")  # never reached: the arguments fail first
    for kwargs, error, match in [
        ({"tls_cert_file": files["cert"]}, ValueError, "go together"),
        ({"tls_key_file": files["key"]}, ValueError, "go together"),
        ({"token": ""}, ValueError, "token"),
        ({"token": "two words"}, ValueError, "whitespace"),
        ({"token": b"bytes"}, ValueError, "token"),
        ({"tls_cert_file": str(tmp_path / "nope.crt"), "tls_key_file": files["key"]},
         FileNotFoundError, "nope.crt"),
        ({"tls_cert_file": files["token_file"], "tls_key_file": files["key"]}, ValueError, "PEM"),
    ]:  # fmt: skip
        with pytest.raises(error, match=match):
            TailServer(missing_model, MODEL, **kwargs)
    ca = credentials.read_pem(files["cert"], "TLS CA")
    for args, kwargs, match in [
        (("rest", "http://127.0.0.1:8501"), {"root_certificates": ca}, "https://"),
        (("rest", None), {"token": "a\nb"}, "token"),
        (("grpc", "127.0.0.1:1"), {"root_certificates": "not bytes"}, "root_certificates"),
        (("grpc", "127.0.0.1:1"), {"root_certificates": b"not PEM"}, "root_certificates"),
    ]:
        with pytest.raises(device.DeviceError, match=match):
            device.make_client(*args, MODEL, **kwargs)
    # No server given: a CA means REST over https.
    assert device.make_client("rest", None, MODEL, root_certificates=ca).url.startswith("https://")


# --- the tool as a separate process ---------------------------------------------------------


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tool_serves_with_token_and_tls(files, tmp_path):
    grpc_port, rest_port = _free_port(), _free_port()
    log_path = tmp_path / "serve.log"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "tfsplit_tools.serve", f"--model_base_path={files['base']}",
                f"--model_name={MODEL}", f"--grpc_port={grpc_port}", f"--rest_port={rest_port}",
                f"--token_file={files['token_file']}", f"--tls_cert={files['cert']}",
                f"--tls_key={files['key']}",
            ],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    ca = credentials.read_pem(files["cert"], "TLS CA")
    url, target = f"https://127.0.0.1:{rest_port}", f"127.0.0.1:{grpc_port}"
    try:
        clients = [
            device.make_client("rest", url, MODEL, 20, token=TOKEN, root_certificates=ca),
            device.make_client("grpc", target, MODEL, 20, token=TOKEN, root_certificates=ca),
        ]
        try:
            clients[0].wait_ready(timeout_s=45)
        except device.ServingError:
            pytest.fail(f"the server never became ready:\n{log_path.read_text()[-3000:]}")
        for client in clients:
            with contextlib.closing(client):
                _check_served(client)
        for protocol, address in (("rest", url), ("grpc", target)):
            refused = device.make_client(protocol, address, MODEL, 20, root_certificates=ca)
            with contextlib.closing(refused):
                error = _refusal(refused)
            assert error.code == "UNAUTHENTICATED" or error.http_status == 401
    finally:
        return_code = fx.stop_server(process, log_path)
    log = log_path.read_text()
    assert return_code == 0, log[-3000:]
    assert f"grpc={target} rest={url} (TLS) (token required)" in log
    assert TOKEN not in log
