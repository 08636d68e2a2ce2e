"""Tests of each device's own identity (a tokens file, mutual TLS) and of secure-by-default.

Every server is real and on 127.0.0.1: a small echo service behind `DeviceIdentity` (what the
interceptor lets through, and whom `identify` names), the training servicer with `identify` wired
in (a device acting as another gets PERMISSION_DENIED), and `tfsplit-train-server` as a process
(SIGHUP reloads its tokens file; a host other than loopback without TLS is refused). The CA, the
server's certificate and the devices' client certificates are made with the openssl CLI in a
temporary folder. No test sends anything to an address other than loopback: the clear-text check
runs before a channel exists, and 0.0.0.0 is bound for a moment and never called.
"""

# isort: off
import tfsplit  # noqa: F401  (first: sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

# isort: on
import concurrent.futures
import http.client
import os
import re
import select
import signal
import subprocess
import sys
import time
import types

import grpc
import numpy as np
import pytest

from tfsplit import codec
from tfsplit.auth import credentials
from tfsplit.auth import grpc_server as security
from tfsplit.auth import identity as identity_lib
from tfsplit.auth import transport
from tfsplit.device import grpc_client, rest
from tfsplit.device.training.channel import TrainingClient
from tfsplit.protocol import split_training_pb2 as pb
from tfsplit.protocol import split_training_pb2_grpc as pb_grpc
from tfsplit.training import trainer
from tfsplit.training.config import base_config, phase
from tfsplit.training.messages import model_digest
from tfsplit.training.server import service as service_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO_ROOT, "configs", "sl.py") + ":smoke"
TOKEN_A = "device-a-token-0123456789abcdef"
TOKEN_B = "device-b-token-fedcba9876543210"
TOKENS = f"# the run's devices\ndevice-a {TOKEN_A}\n\ndevice-b {TOKEN_B}\n"
NOT_CONTACTED = "192.0.2.1"  # TEST-NET-1 (RFC 5737): never routed, and never called here
STARTUP_S = 180  # a tool process imports TensorFlow on two shared cores
# absl's Python log lines and TensorFlow's start-up notices: not the one-line error.
LOG_LINE = re.compile(
    r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] |onednn|cuinit|cuda|absl::InitializeLog|"
    r"cpu instructions",
    re.IGNORECASE,
)


# ---------------------------------------------------------------------------------- test PKI


def _openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A test CA; the server's certificate for 127.0.0.1 and client certificates it signed (CN
    device-a, device-b, and one whose CN is no device id); a stranger CA's device-a."""
    tmp = tmp_path_factory.mktemp("pki")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"]
    paths = {}

    def make(name, subject, ca=None, *extensions):
        paths[name] = (str(tmp / f"{name}.crt"), str(tmp / f"{name}.key"))
        signer = ["-CA", paths[ca][0], "-CAkey", paths[ca][1]] if ca else []
        leaf = ["-addext", "basicConstraints=CA:FALSE"] if ca else []
        _openssl(
            "req", "-x509", *key, "-subj", subject, *signer, *leaf, *extensions,
            "-keyout", paths[name][1], "-out", paths[name][0],
        )  # fmt: skip

    make("ca", "/CN=tfsplit-test-ca")
    make("stranger_ca", "/CN=someone-else")
    make("server", "/CN=127.0.0.1", "ca", "-addext", "subjectAltName=IP:127.0.0.1")
    make("device-a", "/CN=device-a", "ca")
    make("device-b", "/CN=device-b", "ca")
    make("no-id", "/CN=not a device id!", "ca")
    make("stranger", "/CN=device-a", "stranger_ca")
    return paths


def _pem(path):
    with open(path, "rb") as f:
        return f.read()


def _mtls_server_credentials(pki):
    return security.server_credentials(*pki["server"], client_ca_file=pki["ca"][0])


def _mtls_channel(pki, port, client=None):
    cert, key = pki[client] if client else (None, None)
    channel_credentials = grpc.ssl_channel_credentials(
        root_certificates=_pem(pki["ca"][0]),
        private_key=key and _pem(key),
        certificate_chain=cert and _pem(cert),
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials)


def _tokens_file(directory, text=TOKENS):
    path = os.path.join(directory, "tokens")
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


def _code(call):
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code()


def _as(token):
    return credentials.call_metadata(token)


# ---------------------------------------------------------------------------------- tokens file


def test_a_tokens_file_maps_device_ids_to_tokens(tmp_path):
    tokens = identity_lib.read_tokens_file(_tokens_file(str(tmp_path)))
    assert tokens == {"device-a": TOKEN_A, "device-b": TOKEN_B}
    table = identity_lib.DeviceTokens(_tokens_file(str(tmp_path)))
    assert table.devices == ["device-a", "device-b"]
    assert table.device_of(TOKEN_A) == "device-a" and table.device_of(TOKEN_B) == "device-b"
    for unknown in (None, "", TOKEN_A[:-1], TOKEN_A + "x", TOKEN_A.upper()):
        assert table.device_of(unknown) is None


@pytest.mark.parametrize(
    "text, says",
    [
        (f"device-a {TOKEN_A} extra\n", "line 1: expected '<device id> <token>'"),
        ("device-a\n", "found 1 field"),
        (f"bad/id {TOKEN_A}\n", "line 1: the device id must be 1 to 64"),
        (f"{'d' * 65} {TOKEN_A}\n", "the device id must be 1 to 64"),
        ("device-a short-token\n", "must be 16 to 4096 printable characters"),
        (f"device-a {TOKEN_A}\ndevice-a {TOKEN_B}\n", "line 2: device 'device-a' is listed twice"),
        (f"device-a {TOKEN_A}\ndevice-b {TOKEN_A}\n", "line 2: the token of 'device-b' is another"),
        ("# nobody yet\n\n", "lists no device"),
    ],
)
def test_a_bad_tokens_file_is_refused_with_its_line_and_never_its_token(tmp_path, text, says):
    path = _tokens_file(str(tmp_path), text)
    with pytest.raises(identity_lib.TokensFileError) as raised:
        identity_lib.read_tokens_file(path)
    message = str(raised.value)
    assert says in message and len(message) < 1024, message
    assert TOKEN_A not in message and TOKEN_B not in message and "short-token" not in message


def test_a_missing_unreadable_or_huge_tokens_file_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="one '<device id> <token>' line per device"):
        identity_lib.read_tokens_file(str(tmp_path / "missing"))
    (tmp_path / "latin1").write_bytes(b"device-a caf\xe9-0123456789abcdef\n")
    with pytest.raises(identity_lib.TokensFileError, match="not UTF-8"):
        identity_lib.read_tokens_file(str(tmp_path / "latin1"))
    (tmp_path / "huge").write_bytes(b"#" * (identity_lib.MAX_TOKENS_FILE_BYTES + 1))
    with pytest.raises(identity_lib.TokensFileError, match="over"):
        identity_lib.read_tokens_file(str(tmp_path / "huge"))


def test_reload_revokes_a_removed_device_and_a_bad_file_keeps_the_last_good_table(tmp_path):
    path = _tokens_file(str(tmp_path))
    table = identity_lib.DeviceTokens(path)
    _tokens_file(str(tmp_path), f"device-a {TOKEN_A}\n")
    assert table.reload() == ["device-a"]
    assert table.device_of(TOKEN_B) is None and table.device_of(TOKEN_A) == "device-a"
    _tokens_file(str(tmp_path), "device-a oops\n")
    with pytest.raises(identity_lib.TokensFileError):
        table.reload()
    os.remove(path)
    with pytest.raises(FileNotFoundError):
        table.reload()
    assert table.device_of(TOKEN_A) == "device-a"  # still the last good one


# ------------------------------------------------------------------- the interceptor, for real


@pytest.fixture
def echo_server():
    """Starts a one-method service behind a DeviceIdentity; the method answers whom `identify`
    names. Yields start(identity, credentials=None) -> a channel factory's port."""
    servers = []

    def start(identity, server_credentials=None):
        def who(request, context):
            return identity.identify(context).encode()

        handler = grpc.method_handlers_generic_handler(
            "test.Who", {"Who": grpc.unary_unary_rpc_method_handler(who)}
        )
        server = grpc.server(concurrent.futures.ThreadPoolExecutor(2), interceptors=[identity])
        server.add_generic_rpc_handlers((handler,))
        if server_credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", server_credentials)
        server.start()
        servers.append(server)
        return port

    yield start
    for server in servers:
        server.stop(0)


def _who(channel, token=None):
    return channel.unary_unary("/test.Who/Who")(b"", timeout=20, metadata=_as(token)).decode()


def test_each_token_is_its_own_device_and_an_unknown_one_is_unauthenticated(echo_server, tmp_path):
    tokens = identity_lib.DeviceTokens(_tokens_file(str(tmp_path)))
    port = echo_server(identity_lib.DeviceIdentity(tokens))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    assert _who(channel, TOKEN_A) == "device-a"
    assert _who(channel, TOKEN_B) == "device-b"
    for token in (None, "not-a-known-token-at-all", TOKEN_A + "x"):
        assert _code(lambda: _who(channel, token)) == grpc.StatusCode.UNAUTHENTICATED


def test_a_client_certificate_names_its_device(echo_server, pki, tmp_path):
    identity = identity_lib.DeviceIdentity(client_certificates=True)
    port = echo_server(identity, _mtls_server_credentials(pki))
    assert _who(_mtls_channel(pki, port, "device-a")) == "device-a"
    assert _who(_mtls_channel(pki, port, "device-b")) == "device-b"
    no_id = _code(lambda: _who(_mtls_channel(pki, port, "no-id")))
    assert no_id == grpc.StatusCode.UNAUTHENTICATED
    # No certificate, or one from another CA: the handshake fails, nothing reaches the service.
    for client in (None, "stranger"):
        assert _code(lambda: _who(_mtls_channel(pki, port, client))) == grpc.StatusCode.UNAVAILABLE


def test_with_both_the_token_and_the_certificate_must_name_the_same_device(
    echo_server, pki, tmp_path
):
    tokens = identity_lib.DeviceTokens(_tokens_file(str(tmp_path)))
    identity = identity_lib.DeviceIdentity(tokens, client_certificates=True)
    port = echo_server(identity, _mtls_server_credentials(pki))
    as_a = _mtls_channel(pki, port, "device-a")
    assert _who(as_a, TOKEN_A) == "device-a"
    assert _code(lambda: _who(as_a, TOKEN_B)) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: _who(as_a)) == grpc.StatusCode.UNAUTHENTICATED


# --------------------------------------------------- the training servicer: only as itself


def _tiny_config():
    """ResNet-18 at 1/8 width: a quick tail to open a run."""
    config = base_config("deprune")
    config.model.backbone = "resnet18"
    config.model.cut = "stage2"
    config.model.width_multiplier = 0.125
    config.data.batch_size = 4
    config.phases = [phase(budget=4, epochs=1, learning_rate=0.05)]
    return config


@pytest.fixture(scope="module")
def tiny():
    config = _tiny_config()
    info = types.SimpleNamespace(image_shape=(32, 32, 3), num_classes=10)
    return config, trainer.build_split_model(config, info)


@pytest.fixture
def training_server(tiny):
    """Starts a TrainingServicer whose `identify` is the DeviceIdentity's; yields start(...)."""
    config, _ = tiny
    servers = []

    def start(identity, server_credentials=None):
        def build_split(image_shape, num_classes):
            info = types.SimpleNamespace(image_shape=image_shape, num_classes=num_classes)
            return trainer.build_split_model(config, info)

        servicer = service_lib.TrainingServicer(build_split, identify=identity.identify)
        server, port = service_lib.serve(
            servicer, 0, credentials=server_credentials, interceptors=[identity]
        )
        servers.append(server)
        return port

    yield start
    for server in servers:
        server.stop(0)


def _hello(model, device_id):
    return pb.HelloRequest(
        model_digest=model_digest(model),
        image_shape=[32, 32, 3],
        num_classes=10,
        device_id=device_id,
    )


def _train(model, device_id, step):
    values = np.random.default_rng(step).normal(size=(4, 16, 16, 4)).astype(np.float32)
    payload = codec.encode(values, [3, 1, 2, 0], model.channels, "float16", labels=np.arange(4))
    return pb.StepRequest(
        kind=pb.StepRequest.TRAIN,
        model_digest=model_digest(model),
        step=step,
        payload=payload,
        learning_rate=0.05,
        device_id=device_id,
    )


def _impersonation_is_refused(call, model):
    """Device a acting as device b gets PERMISSION_DENIED on every call that names a device, and
    b's own run is untouched. call(who, method, request): `method` with who's ("a", "b")
    credentials."""
    assert call("a", "Hello", _hello(model, "device-a")).next_step == 0
    assert call("b", "Hello", _hello(model, "device-b")).next_step == 0
    checkpoint = pb.CheckpointRequest(model_digest=model_digest(model), device_id="device-b")
    average = pb.AverageHeadsRequest(
        model_digest=model_digest(model), device_id="device-b", round=0, samples=1
    )
    for method, request in [
        ("Hello", _hello(model, "device-b")),
        ("Step", _train(model, "device-b", 0)),
        ("Checkpoint", checkpoint),
        ("AverageHeads", average),
        ("Leave", pb.LeaveRequest(model_digest=model_digest(model), device_id="device-b")),
    ]:
        code = _code(lambda: call("a", method, request))
        assert code == grpc.StatusCode.PERMISSION_DENIED, (method, code)
    # b's step 0 is still to be trained (the refused one did not count), and a trains as itself.
    assert call("b", "Step", _train(model, "device-b", 0)).step == 0
    assert call("a", "Step", _train(model, "device-a", 0)).step == 0


def test_a_device_token_cannot_act_as_another_device(training_server, tiny, tmp_path):
    tokens = identity_lib.DeviceTokens(_tokens_file(str(tmp_path)))
    port = training_server(identity_lib.DeviceIdentity(tokens))
    stub = pb_grpc.SplitTrainingStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    token = {"a": TOKEN_A, "b": TOKEN_B}

    def call(who, method, request):
        return getattr(stub, method)(request, timeout=60, metadata=_as(token[who]))

    _impersonation_is_refused(call, tiny[1])


def test_a_client_certificate_cannot_act_as_another_device(training_server, tiny, pki):
    identity = identity_lib.DeviceIdentity(client_certificates=True)
    port = training_server(identity, _mtls_server_credentials(pki))
    stubs = {
        who: pb_grpc.SplitTrainingStub(_mtls_channel(pki, port, f"device-{who}")) for who in "ab"
    }

    def call(who, method, request):
        return getattr(stubs[who], method)(request, timeout=60)

    _impersonation_is_refused(call, tiny[1])


def test_a_training_client_presents_its_certificate(training_server, tiny, pki):
    identity = identity_lib.DeviceIdentity(client_certificates=True)
    port = training_server(identity, _mtls_server_credentials(pki))
    cert, key = pki["device-a"]
    client = TrainingClient(
        f"127.0.0.1:{port}",
        root_certificates=_pem(pki["ca"][0]),
        certificate_chain=_pem(cert),
        private_key=_pem(key),
        retry_for_s=0,
    )
    try:
        assert client.call("Hello", _hello(tiny[1], "device-a")).next_step == 0
        refused = _code(lambda: client.call("Hello", _hello(tiny[1], "device-b")))
        assert refused == grpc.StatusCode.PERMISSION_DENIED
    finally:
        client.close()
    with pytest.raises(ValueError, match="go together"):
        TrainingClient("127.0.0.1:1", certificate_chain=_pem(cert))


# ------------------------------------------------------------- tfsplit-train-server, a process


def _environment():
    # The test process's TF_CPP_MIN_LOG_LEVEL (set by importing tfsplit) would override the tool's.
    return {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}


def _start_tool(tool, args, stderr_path):
    with open(stderr_path, "w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", f"tfsplit_tools.{tool}", *args],
            cwd=REPO_ROOT,
            env=_environment(),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )


def _first_line(process, timeout_s=STARTUP_S):
    """The process's first stdout line, waited for at most `timeout_s`."""
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    assert ready, f"no output within {timeout_s} s"
    return process.stdout.readline()


def _stop(process):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def _status_of(stub, token):
    """The status a call with `token` gets (OK or the refusal's code)."""
    try:
        stub.TailWeights(pb.TailWeightsRequest(), timeout=20, metadata=_as(token))
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_sighup_reloads_the_tokens_file_and_revokes_a_removed_device(tmp_path):
    tokens = _tokens_file(str(tmp_path))
    server = _start_tool(
        "train_server",
        [f"--config={SMOKE}", f"--workdir={tmp_path / 'server'}", "--port=0"]
        + [f"--tokens_file={tokens}"],
        tmp_path / "stderr",
    )
    try:
        line = _first_line(server)
        match = re.match(r"listening on (127\.0\.0\.1:\d+)", line)
        assert match, line + (tmp_path / "stderr").read_text()[-3000:]
        stub = pb_grpc.SplitTrainingStub(grpc.insecure_channel(match.group(1)))
        unauthenticated = grpc.StatusCode.UNAUTHENTICATED
        # Both tokens get past the token check (the service answers: no run is open yet).
        assert _status_of(stub, TOKEN_B) != unauthenticated
        assert _status_of(stub, TOKEN_A) != unauthenticated
        _tokens_file(str(tmp_path), f"device-a {TOKEN_A}\n")  # revoke device-b
        server.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while _status_of(stub, TOKEN_B) != unauthenticated:
            assert time.monotonic() < deadline, "device-b still accepted 30 s after SIGHUP"
            time.sleep(0.1)
        assert _status_of(stub, TOKEN_A) != unauthenticated
        # A broken file on SIGHUP is not loaded: the last good table stays, the server serves on.
        _tokens_file(str(tmp_path), "device-a broken\n")
        server.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert server.poll() is None
        assert _status_of(stub, TOKEN_A) != unauthenticated
        assert _status_of(stub, TOKEN_B) == unauthenticated
    finally:
        _stop(server)
    log = (tmp_path / "stderr").read_text()
    assert "Tokens file reloaded: 1 devices (device-a)" in log, log[-3000:]
    assert "Tokens file not reloaded, the previous one stays in force" in log, log[-3000:]
    assert TOKEN_A not in log and TOKEN_B not in log


# ---------------------------------------------------------------------- secure by default


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.5.6.7", "::1", "[::1]", "localhost", "LocalHost", "::ffff:127.0.0.1"]
)
def test_loopback_is_only_the_loopback_range_and_localhost(host):
    assert transport.is_loopback(host)


@pytest.mark.parametrize(
    "host",
    ["0.0.0.0", "", "::", NOT_CONTACTED, "10.0.0.1", "example.com", "localhost.example.com"]
    + ["127.0.0.1.nip.io", None],
)
def test_anything_else_is_not_loopback(host):
    assert not transport.is_loopback(host)


def test_the_host_of_a_grpc_target():
    assert transport.target_host("127.0.0.1:50051") == "127.0.0.1"
    assert transport.target_host("[::1]:50051") == "::1"
    assert transport.target_host("dns:///localhost:50051") == "localhost"
    assert transport.target_host("ipv4:127.0.0.1:1,10.0.0.1:1") == "127.0.0.1"
    assert transport.target_host("unix:/tmp/socket") is None
    assert transport.is_local_target("unix:/tmp/socket")
    assert not transport.is_local_target(f"dns:///{NOT_CONTACTED}:50051")


def test_a_token_is_never_sent_in_clear_text_off_loopback(monkeypatch):
    """Each device client refuses before it builds a channel or a connection."""

    def no_connection(*args, **kwargs):
        raise AssertionError("a channel or connection was made")

    monkeypatch.setattr(grpc, "insecure_channel", no_connection)
    monkeypatch.setattr(grpc, "secure_channel", no_connection)
    monkeypatch.setattr(http.client, "HTTPConnection", no_connection)
    started = time.monotonic()
    target = f"{NOT_CONTACTED}:50051"
    with pytest.raises(ValueError, match="Refusing to send the token in clear text") as raised:
        TrainingClient(target, token=TOKEN_A)
    assert TOKEN_A not in str(raised.value) and len(str(raised.value)) < 1024
    with pytest.raises(ValueError, match="clear text"):
        TrainingClient(f"dns:///{NOT_CONTACTED}:50051", token=TOKEN_A)
    with pytest.raises(ValueError, match="clear text"):
        grpc_client.GrpcClient(target, "tail", token=TOKEN_A)
    with pytest.raises(ValueError, match="clear text"):
        rest.RestClient(f"http://{NOT_CONTACTED}:8501", "tail", token=TOKEN_A)
    with pytest.raises(ValueError, match="clear text"):
        rest.RestClient(f"http://user@{NOT_CONTACTED}:8501", "tail", token=TOKEN_A)
    assert time.monotonic() - started < 5
    # Over TLS, or without a token, the same target passes the check.
    transport.check_token_transport(target, TOKEN_A, tls=True)
    transport.check_token_transport(target, None, tls=False)


def test_a_token_goes_in_clear_text_to_loopback():
    for target in ("127.0.0.1:1", "localhost:1", "[::1]:1"):
        TrainingClient(target, token=TOKEN_A, retry_for_s=0).close()
        grpc_client.GrpcClient(target, "tail", token=TOKEN_A).close()
        rest.RestClient(f"http://{target}", "tail", token=TOKEN_A).close()


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip() and not LOG_LINE.search(line)]


@pytest.mark.parametrize(
    "tool, args",
    [
        ("train_server", [f"--config={SMOKE}", "--workdir={tmp}/server"]),
        ("serve", ["--model_base_path={tmp}/missing", "--model_name=tail"]),
    ],
)
def test_a_server_off_loopback_without_tls_does_not_start(tool, args, tmp_path):
    args = [arg.format(tmp=tmp_path) for arg in args] + ["--host=0.0.0.0", "--port=0"]
    if tool == "serve":
        args[-1:] = ["--grpc_port=0", "--rest_port=0"]
    result = subprocess.run(
        [sys.executable, "-m", f"tfsplit_tools.{tool}", *args],
        cwd=REPO_ROOT,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=STARTUP_S,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = _error_lines(result.stderr)
    name = "tfsplit-" + tool.replace("_", "-")
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"{name}: error: Refusing to listen on '0.0.0.0' without TLS")
    assert "--insecure" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "server").exists()  # refused before writing anything


def test_an_insecure_server_off_loopback_starts_and_warns(tmp_path):
    """Bound to 0.0.0.0 for a moment (port 0) and stopped at once; nothing is sent to it."""
    server = _start_tool(
        "train_server",
        [f"--config={SMOKE}", f"--workdir={tmp_path / 'server'}", "--port=0"]
        + ["--host=0.0.0.0", "--insecure"],
        tmp_path / "stderr",
    )
    try:
        line = _first_line(server)
    finally:
        _stop(server)
    log = (tmp_path / "stderr").read_text()
    assert re.match(r"listening on 0\.0\.0\.0:\d+", line), line + log[-3000:]
    assert "--insecure: listening on '0.0.0.0' without TLS" in log, log[-3000:]
    assert "with no token and no client certificates" in log, log[-3000:]
    assert "before the run's first step (--warm_up)" in log, log[-3000:]  # on off loopback
