"""Deployment measured end to end over loopback: the deployed path against the Keras model.

    result = run_split_inference("/tmp/tfsplit/deprune", protocols=("rest", "grpc"))
    print(format_table(result.rows))

For every head dtype a TailServer serves the matching exported tail on 127.0.0.1 (ports picked by
the OS) and the device runner (`tfsplit.device`: LiteRT head, wire cast, its own REST or gRPC
client) sends it the run's test images, one per request by default, as a device would. Each
(dtype, protocol) pass reports top-1 accuracy, the float Keras split model's accuracy on the same
images and the share of equal top-1 predictions (agreement), bytes per sample twice
(`request_bytes`, what the requests weighed on the wire; `payload_bytes`, the codec's encoding of
the same selections, as training counts it), and p50/p95 latency per stage. Server and device
share this process and its cores, so the latencies are an upper bound on loopback and say nothing
about a real network. Needs TensorFlow (the server, the Keras reference); the device side alone
is `tfsplit.device`.
"""

import csv
import dataclasses
import json
import os
import platform

import numpy as np
from absl import logging

from tfsplit import device as device_lib
from tfsplit import export as export_lib
from tfsplit.device import stats
from tfsplit.export import head as head_lib
from tfsplit.export import report as report_lib
from tfsplit.export import run as run_lib
from tfsplit.serving import TailServer

RESULT_JSON = "infer.json"
RESULT_CSV = "infer.csv"
DEFAULT_MODEL_NAME = "tfsplit_tail"  # export_split's default prefix; the dtype is appended.
TABLE_COLUMNS = (
    ("dtype", "dtype"),
    ("protocol", "proto"),
    ("samples", "samples"),
    *report_lib.ACCURACY_COLUMNS,
    ("request_bytes_per_sample", "request_bytes", ".0f"),
    ("payload_bytes_per_sample", "payload_bytes", ".0f"),
    *stats.latency_columns("head"),
    *stats.latency_columns("network_tail", "net+tail"),
    *stats.latency_columns("total"),
)


class InferError(ValueError):
    """Split inference was asked for something the arguments or the files cannot give."""


@dataclasses.dataclass
class InferResult:
    """What `run_split_inference` measured.

    Attributes:
      workdir: the training run.
      export_dir: the heads and, under `serving/`, the tails that were served.
      settings: the arguments that shaped the numbers (batch size, threads, samples, ...).
      rows: one dict per (dtype, protocol), see `run_split_inference`.
    """

    workdir: str
    export_dir: str
    settings: dict
    rows: list


def _is_positive(value, types=(int,)):
    return not isinstance(value, bool) and isinstance(value, types) and value > 0


def _check_args(dtypes, protocols, max_samples, batch_size, num_threads, max_seconds):
    dtypes = head_lib.check_dtypes(dtypes)
    protocols = (protocols,) if isinstance(protocols, str) else tuple(protocols)
    if not protocols or any(p not in device_lib.PROTOCOLS for p in protocols):
        raise InferError(
            f"`protocols` must be names from {device_lib.PROTOCOLS}. Received: {protocols!r}"
        )
    counts = {"batch_size": batch_size, "num_threads": num_threads, "max_samples": max_samples}
    for name, value in counts.items():
        if not (_is_positive(value) or (name == "max_samples" and value is None)):
            raise InferError(f"`{name}` must be an integer >= 1. Received: {name}={value!r}")
    if not _is_positive(max_seconds, (int, float)):
        raise InferError(f"`max_seconds` must be > 0. Received: max_seconds={max_seconds!r}")
    return dtypes, protocols


def _head_path(export_dir, dtype):
    return os.path.join(export_dir, f"head_{dtype}.tflite")


def _tail_base(export_dir, model_name, dtype):
    return os.path.join(export_dir, report_lib.SERVING_DIR, f"{model_name}_{dtype}")


def _is_exported(export_dir, model_name, dtype, version, ushaped):
    head = _head_path(export_dir, dtype)
    tail = os.path.join(_tail_base(export_dir, model_name, dtype), str(version), "saved_model.pb")
    paths = [head, os.path.splitext(head)[0] + ".json", tail]
    if ushaped:
        paths.append(os.path.join(export_dir, export_lib.ushaped.TOP_FILE))
    return all(os.path.isfile(p) for p in paths)


def _source_workdir(export_dir, dtypes):
    """The training workdir recorded in the first head JSON of an export."""
    for dtype in dtypes:
        path = os.path.splitext(_head_path(export_dir, dtype))[0] + ".json"
        if os.path.isfile(path):
            workdir = device_lib.load_spec(path).source_workdir
            if workdir:
                return workdir
    raise InferError(
        f"No head JSON with a source workdir in {export_dir!r}; pass the training workdir."
    )


def prepare_export(
    workdir=None,
    export_dir=None,
    dtypes=export_lib.HEAD_DTYPES,
    qat="auto",
    model_name=DEFAULT_MODEL_NAME,
    version=1,
):
    """Loads the run and makes sure every dtype has a head and a tail, exporting what is missing.

    Args:
      workdir: the training workdir; None takes the one recorded in the export's head JSON.
      export_dir: the export directory; None takes `<workdir>/export`.
      dtypes: head dtypes needed.
      qat: as in `export_split`, for heads exported here.
      model_name, version: the tails' name prefix and version, as `export_split` writes them.

    Returns:
      (TrainedRun, export_dir).

    Raises:
      InferError: neither directory given, or no workdir to be found.
      ExportError: the run cannot be loaded or exported (e.g. half an export exists).
    """
    if workdir is None and export_dir is None:
        raise InferError("Pass a training `workdir`, an `export_dir`, or both.")
    if workdir is None:
        workdir = _source_workdir(export_dir, dtypes)
    run = run_lib.as_run(workdir, ushaped=None)
    if export_dir is None:
        export_dir = os.path.join(run.workdir, report_lib.EXPORT_DIR)
    export_dir = os.fspath(export_dir)
    ushaped = hasattr(run.split, "top")
    missing = [d for d in dtypes if not _is_exported(export_dir, model_name, d, version, ushaped)]
    if missing and ushaped:  # the top is one file for every head: all of it again
        logging.info("Exporting the U-shaped split's %s heads, top and middles", list(dtypes))
        export_lib.export_ushaped(
            run, export_dir, dtypes=dtypes, model_name=model_name, version=version, overwrite=True
        )
    elif missing:
        logging.info("Exporting %s heads and tails to %s", missing, export_dir)
        export_lib.export_split(
            run, export_dir, dtypes=missing, qat=qat, model_name=model_name, version=version
        )
    return run, export_dir


def _keras_predictions(run, images, indices, cache):
    key = tuple(int(i) for i in indices)
    if key not in cache:
        cache[key] = run_lib.keras_split_logits(run, images, indices).argmax(-1)
    return cache[key]


def _row(dtype, protocol, spec, record, labels, keras):
    predictions = record.probabilities.argmax(-1)
    labels, keras = labels[: record.samples], keras[: record.samples]
    return {
        "dtype": dtype,
        "protocol": protocol,
        "budget": spec.budget,
        "accuracy": float(np.mean(predictions == labels)),
        "keras_accuracy": float(np.mean(keras == labels)),
        "agreement": float(np.mean(predictions == keras)),
        **record.summary(),
    }


def _serve_and_run(run, export_dir, dtype, protocols, images, options, keras_cache):
    """All protocols' passes for one dtype against one in-process TailServer."""
    head = device_lib.HeadRunner(_head_path(export_dir, dtype), num_threads=options["num_threads"])
    source = head.spec.source_workdir
    if source and os.path.realpath(source) != os.path.realpath(run.workdir):
        logging.warning(
            "%s was exported from %s, not %s: agreement compares two different models.",
            head.model_path,
            source,
            run.workdir,
        )
    keras = _keras_predictions(run, images, head.spec.indices, keras_cache)
    name = f"{options['model_name']}_{dtype}"
    base_path = _tail_base(export_dir, options["model_name"], dtype)
    batch_size, version = options["batch_size"], options["version"]
    server = TailServer(base_path, name, version=version, max_batch_size=batch_size).start()
    rows = []
    try:
        for protocol in protocols:
            address = server.rest_url if protocol == "rest" else server.grpc_target
            client = device_lib.make_client(protocol, address, name, options["timeout_s"])
            runner = device_lib.DeviceRunner(head, client, options["num_threads"])
            try:
                record = device_lib.run_images(runner, images, batch_size, options["max_seconds"])
            finally:
                client.close()
            rows.append(_row(dtype, protocol, head.spec, record, run.test_labels, keras))
            logging.info("Split inference %s/%s: %s", dtype, protocol, rows[-1])
    finally:
        server.stop()
    return rows


def run_split_inference(
    workdir=None,
    export_dir=None,
    dtypes=export_lib.HEAD_DTYPES,
    protocols=("rest",),
    max_samples=None,
    batch_size=1,
    num_threads=1,
    max_seconds=300.0,
    qat="auto",
    timeout_s=30.0,
    model_name=DEFAULT_MODEL_NAME,
    version=1,
):
    """Runs the run's test images through device runner -> loopback TailServer, per dtype.

    Args:
      workdir, export_dir: the training run and its export (see `prepare_export`; what is
        missing is exported first).
      dtypes: head dtypes to run (each served with the tail of its wire dtype).
      protocols: "rest" and/or "grpc": the device runner's own clients.
      max_samples: the first this many test images; None: the whole test set.
      batch_size: images per request (1: a device sends each image alone).
      num_threads: LiteRT interpreter threads of the head.
      max_seconds: time limit of each (dtype, protocol) pass; a pass stopped early reports the
        samples it sent and complete=False.
      qat: as in `export_split`, for heads exported here.
      timeout_s: per-request timeout.
      model_name, version: the tails' name prefix and version directory.

    Returns:
      An `InferResult`; each row: dtype, protocol, budget, samples, requests, complete,
      accuracy, keras_accuracy (float Keras split model at the head's budget, same images),
      agreement (equal top-1 share), request_bytes_per_sample (what the requests weighed on the
      wire), payload_bytes_per_sample (`codec.payload_nbytes` of the same selections), and
      <stage>_p50_ms/_p95_ms/_mean_ms for the stages head, encode, network_tail, total.

    Raises:
      InferError: bad arguments. ExportError: the run or export cannot be used.
      ServingError: the server refused a request (a mismatched export).
    """
    dtypes, protocols = _check_args(
        dtypes, protocols, max_samples, batch_size, num_threads, max_seconds
    )
    run, export_dir = prepare_export(workdir, export_dir, dtypes, qat, model_name, version)
    count = len(run.test_images) if max_samples is None else min(max_samples, len(run.test_images))
    images = run.test_images[:count]
    limits = {"batch_size": batch_size, "num_threads": num_threads, "max_seconds": max_seconds}
    options = {**limits, "timeout_s": timeout_s, "model_name": model_name, "version": version}
    keras_cache = {}
    rows = [
        row
        for dtype in dtypes
        for row in _serve_and_run(run, export_dir, dtype, protocols, images, options, keras_cache)
    ]
    settings = {
        "max_samples": count,
        **limits,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "server": "TailServer in the same process, 127.0.0.1",
    }
    return InferResult(os.path.abspath(run.workdir), os.path.abspath(export_dir), settings, rows)


def format_table(rows):
    """The rows of `run_split_inference` as a plain-text table (latencies in ms); a U-shaped
    split's also shows the answers' bytes and the top's latency."""
    columns = TABLE_COLUMNS
    if any("top_p50_ms" in row for row in rows):
        at = columns.index(next(c for c in columns if c[0] == "total_p50_ms"))
        columns = (
            columns[:at]
            + (("answer_bytes_per_sample", "answer_bytes", ".0f"),)
            + tuple(stats.latency_columns("top"))
            + columns[at:]
        )
    return device_lib.format_table(rows, columns)


def write_results(result, out_dir):
    """Writes `infer.json` (settings and rows) and `infer.csv` (rows) into `out_dir`.

    Returns:
      (json path, csv path).
    """
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, RESULT_JSON)
    csv_path = os.path.join(out_dir, RESULT_CSV)
    with open(json_path, "w") as f:
        json.dump(dataclasses.asdict(result), f, indent=2)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(result.rows[0]))
        writer.writeheader()
        writer.writerows(result.rows)
    return json_path, csv_path
