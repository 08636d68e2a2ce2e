"""Tests of tfsplit-serve's token, TLS and REST limits, through the device's clients
(tfsplit.device) and raw sockets.

A token server (plain TCP) checks that a call without the token, or with another, is refused on
both protocols before it reaches the model, and that the right token is served; a TLS server
(with the token too, as deployed) checks that clients holding the CA are served and plain-text or
untrusting ones are not. The pairs are self-signed certificates for 127.0.0.1 made with the
openssl CLI, as the README's test pair; the tail is the tiny SavedModel of serving_fixtures.

The REST side's limits are probed as an attacker would, on raw sockets: a refused request's body
is never read (the answer comes while the client has sent a sliver of what it declared), a body
over what the model accepts is refused from its Content-Length, slow connections hold at most the
pool's threads and only for the request timeout, and the next good request is still served.
"""

import contextlib
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import serving_fixtures as fx  # imports tfsplit (Keras 2) before TensorFlow loads
from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc

from tfsplit import device
from tfsplit.auth import credentials
from tfsplit.device import rest as device_rest
from tfsplit.serving import TailServer, rest, rest_json
from tfsplit.serving.server import DEFAULT_MAX_REQUEST_BYTES

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


# --- the REST side's limits ----------------------------------------------------------------

PREDICT = f"/v1/models/{MODEL}:predict"


def _rss_bytes():
    """This process's resident memory (the server runs in it), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _head(method="POST", path=PREDICT, **headers):
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _exchange(port, data, timeout_s=10):
    """Sends raw bytes; returns (seconds to the answer's first bytes, everything read until the
    server closed the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        start = time.monotonic()
        sock.sendall(data)
        answer = sock.recv(65536)
        elapsed = time.monotonic() - start
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
    return elapsed, answer


def _status(answer):
    return int(answer.split(b" ", 2)[1])


def _error_body(answer):
    body = answer.partition(b"\r\n\r\n")[2]
    return body, json.loads(body)["error"]


def test_rest_refuses_a_wrong_token_before_reading_the_body(token_server):
    server, calls = token_server
    before_calls, before_rss = len(calls), _rss_bytes()
    declared, sent = 50_000_000, b"0" * (64 << 10)  # a sliver of what the headers announce
    for authorization in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for expect in ({}, {"Expect": "100-continue"}):
            head = _head(Content_Length=declared, **authorization, **expect)
            elapsed, answer = _exchange(server.rest_port, head + sent)
            # Not "100 Continue": the refusal comes first, while the body is still unsent; the
            # server then closes the connection instead of waiting for the other 49.9 MB.
            assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
            assert b"Connection: close" in answer and elapsed < 2.0, elapsed
    assert len(calls) == before_calls
    if before_rss is not None:
        assert _rss_bytes() - before_rss < 16 << 20


def test_rest_refuses_an_oversized_body_before_reading_it(token_server):
    server, calls = token_server
    spec, batch = server.served.spec, server.served.max_batch_size
    limit = server.max_rest_body_bytes
    assert limit == rest_json.max_json_body_bytes(spec, batch) < DEFAULT_MAX_REQUEST_BYTES
    authorization = {"Authorization": f"Bearer {TOKEN}"}
    for expect in ({}, {"Expect": "100-continue"}):
        head = _head(Content_Length=limit + 1, **authorization, **expect)
        elapsed, answer = _exchange(server.rest_port, head)  # headers only: nothing to read
        assert _status(answer) == 413 and elapsed < 2.0, answer[:200]
        body, message = _error_body(answer)
        assert f"at most {limit} bytes" in message and len(body) < 1024
    for headers, status in (({}, 411), ({"Content_Length": "1_0"}, 400)):
        _, answer = _exchange(server.rest_port, _head(**headers, **authorization))
        assert _status(answer) == status, answer[:200]
    # Within the bytes but holding more JSON values than a full batch: refused before parsing.
    many = b'{"inputs": {"values": [' + b"0," * (limit // 3) + b"0]}}"
    _, answer = _exchange(server.rest_port, _head(Content_Length=len(many), **authorization) + many)
    assert _status(answer) == 400 and "JSON values" in _error_body(answer)[1]
    # The limit leaves room for a full batch in either format, even of the longest numbers.
    worst = np.full((batch, spec.height, spec.width, spec.max_budget), np.float32(-1.1754944e-38))
    row = {"indices": list(range(spec.max_budget)), "scale": 1.0, "zero_point": 0}
    for body in ({"inputs": dict(row, values=worst.tolist())},
                 {"instances": [dict(row, values=v) for v in worst.tolist()]}):  # fmt: skip
        assert len(json.dumps(body)) < limit
        text = json.dumps(body).encode()
        assert sum(text.count(c) for c in b"[,:") <= rest_json.max_json_values(spec, batch)
    full = fx.make_payload(DTYPE, batch=batch)
    with contextlib.closing(
        device.make_client("rest", server.rest_url, MODEL, 20, token=TOKEN)
    ) as c:
        assert len(device_rest.predict_body(fx.wire(full))) < limit
        before = len(calls)
        _check_served(c)
        assert len(calls) == before + 1


def test_rest_malformed_json_is_a_short_400(token_server):
    server, _ = token_server
    authorization = {"Authorization": f"Bearer {TOKEN}"}
    for body, match in [
        (b'{"inputs": {"values": [1,', "Malformed JSON"),
        (b"[" * 5_000, "nested too deeply"),
        (json.dumps({"k" * 100_000: 1}).encode(), "exactly one of"),  # echoed keys, clipped
        (json.dumps({"inputs": {"values": [[["x" * 50_000]]]}}).encode(), "Missing"),
    ]:
        head = _head(Content_Length=len(body), **authorization)
        elapsed, answer = _exchange(server.rest_port, head + body)
        error_body, message = _error_body(answer)
        assert _status(answer) == 400 and match in message, message[:200]
        assert len(error_body) < 1024 and elapsed < 5.0


def _slow_connection(port):
    """A connection that starts a request and never finishes it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    sock.sendall(b"POST /v1/models/tail:pred")
    return sock


def test_rest_pool_bounds_threads_and_slow_clients(files):
    timeout_s, workers, queued = 1.5, 2, 2
    server = TailServer(
        files["base"],
        MODEL,
        token=TOKEN,
        max_workers=workers,
        max_queued_connections=queued,
        request_timeout_s=timeout_s,
    )
    with server:
        threads = threading.active_count()
        start = time.monotonic()
        slow = [_slow_connection(server.rest_port) for _ in range(4 * workers)]
        time.sleep(0.3)
        assert threading.active_count() <= threads + workers
        answers = []
        for sock in slow:
            with sock:
                try:
                    answers.append(sock.recv(65536))
                except ConnectionResetError:
                    answers.append(b"")
        elapsed = time.monotonic() - start
        # The first connections held the workers, the next ones waited for them, each for the
        # request timeout at most; the others were refused at once.
        busy = [a for a in answers if a.startswith(b"HTTP/1.1 503 ")]
        assert len(busy) == len(slow) - workers - queued, answers
        assert answers.count(b"") == workers + queued, answers
        assert elapsed < 2 * timeout_s + 3.0
        assert threading.active_count() <= threads + workers
        # A client that trickles bytes is dropped at the request timeout all the same.
        with socket.create_connection(("127.0.0.1", server.rest_port), timeout=15) as sock:
            start = time.monotonic()
            with contextlib.suppress(OSError):
                for byte in _head(Content_Length=10):
                    sock.sendall(bytes([byte]))
                    time.sleep(0.2)
                    if time.monotonic() - start > 3 * timeout_s:
                        break
            assert sock.recv(65536) == b"" and time.monotonic() - start < timeout_s + 1.5
        with contextlib.closing(
            device.make_client("rest", server.rest_url, MODEL, 10, token=TOKEN)
        ) as client:
            _check_served(client)
        assert threading.active_count() <= threads + workers


def test_rest_idle_keep_alive_connection_makes_way(files):
    with TailServer(files["base"], MODEL, max_workers=1, idle_timeout_s=60.0) as server:
        first, second = (device.make_client("rest", server.rest_url, MODEL, 10) for _ in range(2))
        with contextlib.closing(first), contextlib.closing(second):
            _check_served(first)  # its connection stays open, idle, holding the one worker
            start = time.monotonic()
            _check_served(second, seed=1)
            assert time.monotonic() - start < 3.0  # not the idle timeout
            _check_served(first, seed=2)  # the client reconnects


def test_rest_limits_are_checked(files):
    for kwargs, match in [
        ({"max_queued_connections": -1}, "max_queued"),
        ({"request_timeout_s": 0}, "request_timeout_s"),
        ({"idle_timeout_s": float("inf")}, "idle_timeout_s"),
        ({"max_workers": 0}, "max_workers"),
    ]:
        with pytest.raises(ValueError, match=match):
            TailServer(files["base"], MODEL, **kwargs)


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
