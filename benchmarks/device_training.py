"""The two device trainers side by side: the Keras device (`tfsplit-train --server`) and the
LiteRT device without TensorFlow (`tfsplit-device-train`), each against a fresh
`tfsplit-train-server` of the same config, on the same shards, one after the other.

  python -m benchmarks.device_training --config=configs/deprune.py \
      --out=results/device_training/deprune.json

Writes each device's summary (final validation and test accuracy, training bytes), its wall time
and peak memory (the device process's own, from wait4), and the differences. The Keras device
augments with TensorFlow's random crops and the LiteRT device with numpy's: the same recipe, other
draws.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

TOOLS = os.path.dirname(sys.executable)


def _tool(name):
    path = os.path.join(TOOLS, name)
    return path if os.path.exists(path) else name


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(argv, log):
    """Runs `argv` to its end; returns (wall seconds, peak RSS MiB of that process)."""
    started = time.monotonic()
    with open(log, "w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{argv[0]} failed ({process.returncode}):\n{tail}")
    return time.monotonic() - started, usage.ru_maxrss / 1024


def _server(config_args, workdir, port, log):
    argv = [_tool("tfsplit-train-server"), *config_args, f"--workdir={workdir}", f"--port={port}"]
    process = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return process
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}); see {log}")
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"the server did not listen on {port} within 120 s; see {log}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/deprune.py")
    parser.add_argument("--dataset", default="synthetic", help="tfsplit-prepare-data's --dataset")
    parser.add_argument("--num_shards", type=int, default=4)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scratch", default=None, help="Working directory (default: a temp one)")
    args = parser.parse_args()
    scratch = args.scratch or tempfile.mkdtemp(prefix="device_training_")
    os.makedirs(scratch, exist_ok=True)
    shards, head = os.path.join(scratch, "shards"), os.path.join(scratch, "head")
    config = [
        f"--config={args.config}",
        "--config.data.name=shards",
        f"--config.data.path={shards}",
    ]
    _run(
        [
            _tool("tfsplit-prepare-data"),
            f"--dataset={args.dataset}",
            f"--num_shards={args.num_shards}",
            f"--out={shards}",
        ],
        os.path.join(scratch, "prepare.log"),
    )
    _run([_tool("tfsplit-export"), *config, "--trainable", f"--out={head}"], f"{head}.log")
    devices = {
        "keras": lambda port, workdir: [
            _tool("tfsplit-train"), *config, f"--workdir={workdir}",
            f"--server=127.0.0.1:{port}",
        ],
        "litert": lambda port, workdir: [
            _tool("tfsplit-device-train"), f"--model_dir={head}", f"--data={shards}",
            f"--workdir={workdir}", f"--server=127.0.0.1:{port}",
        ],
    }  # fmt: skip
    results = {}
    for name, argv in devices.items():
        port, workdir = _free_port(), os.path.join(scratch, name)
        server = _server(config, workdir + "_server", port, workdir + "_server.log")
        try:
            seconds, peak = _run(argv(port, workdir), workdir + ".log")
        finally:
            server.terminate()
            server.wait(timeout=60)
        with open(os.path.join(workdir, "summary.json")) as f:
            summary = json.load(f)
        results[name] = dict(
            final_val_accuracy=summary["final_val_accuracy"],
            final_test_accuracy=summary["final_test_accuracy"],
            final_budget=summary["final_budget"],
            train_payload_bytes_up=summary["train_payload_bytes_up"],
            train_payload_bytes_down=summary["train_payload_bytes_down"],
            process_seconds=round(seconds, 1),
            peak_rss_mib=round(peak, 1),
        )
        print(name, results[name], flush=True)
    keras, litert = results["keras"], results["litert"]
    report = dict(
        config=args.config,
        dataset=args.dataset,
        command=" ".join(sys.argv),
        devices=results,
        **{
            f"{split}_accuracy_points_litert_minus_keras": round(
                100 * (litert[f"final_{split}_accuracy"] - keras[f"final_{split}_accuracy"]), 2
            )
            for split in ("val", "test")
        },
        time_ratio_litert_over_keras=round(litert["process_seconds"] / keras["process_seconds"], 3),
        memory_ratio_litert_over_keras=round(litert["peak_rss_mib"] / keras["peak_rss_mib"], 3),
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
