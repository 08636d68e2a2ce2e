"""Runs an exported head on this device and asks the tail server for the class: no TensorFlow.

  tfsplit-run-head --head=export/head_int8.tflite --images=cat.png,dog.npy \
      --server=http://192.168.1.10:8501 --model_name=tfsplit_tail_int8
  tfsplit-run-head --head=... --protocol=grpc --server=192.168.1.10:8500
  tfsplit-run-head --head=... --server=https://192.168.1.10:8501 --token_file=token \
      --tls_ca=server.crt                               # tfsplit-serve --token_file --tls_cert
  tfsplit-run-head --head=... --dataset_images=20     # a development machine with tfsplit + TF

Needs numpy, absl-py and ai-edge-litert (gRPC: grpcio; PNG/JPEG: Pillow). The head's JSON
(head_<dtype>.json beside it) says how to normalize, quantize and send. Prints one line per
request (class, probability, per-stage latency, request_bytes: what the request weighed on the
wire, payload_bytes: the codec's encoding of the same selection) and a summary. TF Serving reports
no server-side time, so the network round trip and the tail are one stage, `network+tail`.
"""

import sys

from absl import app, flags

from tfsplit import device
from tfsplit.auth import credentials
from tfsplit_tools import cli

_HEAD = flags.DEFINE_string("head", None, "Head .tflite file.", required=True)
_METADATA = flags.DEFINE_string("metadata", None, "Head JSON; default beside the .tflite.")
_IMAGES = flags.DEFINE_list("images", [], "PNG/JPEG files or uint8 .npy arrays (HWC or NHWC).")
_DATASET_IMAGES = flags.DEFINE_integer(
    "dataset_images",
    None,
    "Instead of --images: the first N test images of the training run "
    "(development machine: needs TensorFlow).",
    lower_bound=1,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Training run for --dataset_images; default the head JSON's source.workdir."
)
_PROTOCOL = flags.DEFINE_enum("protocol", "rest", list(device.PROTOCOLS), "Protocol to the tail.")
_SERVER = flags.DEFINE_string(
    "server",
    None,
    "REST base URL (default http://127.0.0.1:8501) or gRPC host:port (default 127.0.0.1:8500).",
)
_MODEL_NAME = flags.DEFINE_string(
    "model_name", None, "Served tail name; default tfsplit_tail_<head dtype>."
)
_MODEL_VERSION = flags.DEFINE_integer("model_version", None, "Tail version; default the latest.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1, "Images per request.", lower_bound=1)
_NUM_THREADS = flags.DEFINE_integer("num_threads", 1, "Interpreter threads.", lower_bound=1)
_TIMEOUT = flags.DEFINE_float("timeout_s", 30.0, "Per-request timeout in seconds.")
_TOKEN_FILE = flags.DEFINE_string(
    "token_file", None, "Send the token in this file with every request (tfsplit-serve's)."
)
_TLS_CA = flags.DEFINE_string(
    "tls_ca", None, "PEM CA of the server's certificate: TLS (REST: an https:// --server)."
)


def _images(spec):
    if bool(_IMAGES.value) == (_DATASET_IMAGES.value is not None):
        raise app.UsageError("Pass exactly one of --images and --dataset_images.")
    if _IMAGES.value:
        return device.load_images(_IMAGES.value, spec.image_shape), None
    try:  # optional: TensorFlow (a run's test set is read on a development machine, not a device)
        from tfsplit.export import load_run_test_images
    except ImportError as error:
        raise app.UsageError(
            f"--dataset_images needs TensorFlow and tfsplit's training modules ({error}); on a "
            "device pass --images instead."
        ) from None
    return load_run_test_images(_WORKDIR.value or spec.source_workdir, _DATASET_IMAGES.value)


def _print(record, batch_size, labels):
    milliseconds = {stage: 1e3 * values for stage, values in record.seconds.items()}
    for i, (label, p) in enumerate(
        zip(record.probabilities.argmax(-1), record.probabilities.max(-1))
    ):
        r = i // batch_size
        print(
            f"image {i}: class {label} (p={p:.4f})  head {milliseconds['head'][r]:.3f} ms  "
            f"encode {milliseconds['encode'][r]:.3f} ms  network+tail "
            f"{milliseconds['network_tail'][r]:.3f} ms  total {milliseconds['total'][r]:.3f} ms  "
            f"request_bytes {record.request_bytes[r]}  payload_bytes {record.payload_bytes[r]}"
        )
    summary = record.summary()
    print("p50 ms: " + "  ".join(f"{s} {summary[f'{s}_p50_ms']:.3f}" for s in record.seconds))
    print(
        f"per image: request_bytes {summary['request_bytes_per_sample']:.1f}, "
        f"payload_bytes {summary['payload_bytes_per_sample']:.1f}"
    )
    if labels is not None:
        accuracy = (record.probabilities.argmax(-1) == labels).mean()
        print(f"top-1 accuracy: {accuracy:.4f} on {len(labels)} test images")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    token = _TOKEN_FILE.value and credentials.read_token_file(_TOKEN_FILE.value)
    ca = _TLS_CA.value and credentials.read_pem(_TLS_CA.value, "TLS CA")
    try:
        head = device.HeadRunner(_HEAD.value, _METADATA.value, _NUM_THREADS.value)
        images, labels = _images(head.spec)
        model_name = _MODEL_NAME.value or f"tfsplit_tail_{head.spec.wire_dtype}"
        client = device.make_client(
            _PROTOCOL.value,
            _SERVER.value,
            model_name,
            _TIMEOUT.value,
            _MODEL_VERSION.value,
            token=token or None,
            root_certificates=ca or None,
        )
        print(
            f"{head.spec.dtype} head, budget {head.spec.budget} of {head.spec.channels} channels, "
            f"{_PROTOCOL.value} to {client.url}"
        )
        record = device.run_images(device.DeviceRunner(head, client), images, _BATCH_SIZE.value)
    except device.ServingError as error:  # DeviceError, a ValueError, reaches run_tool as is.
        raise app.UsageError(str(error)) from None
    _print(record, _BATCH_SIZE.value, labels)


if __name__ == "__main__":  # python -m: the quieting reaches only what is still to load (cli)
    cli.quiet_tensorflow_startup(sys.argv)
    cli.run(main)
