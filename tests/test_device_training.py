"""The device that trains without TensorFlow (`tfsplit.device.training`) trains the same head as
the Keras device against a real `tfsplit-train-server` on 127.0.0.1, and refuses bad input."""

# isort: off
import tfsplit  # noqa: F401  (first: sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

# isort: on
import json
import os
import shutil
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from tfsplit import callbacks as callbacks_lib
from tfsplit.data import shard_writer
from tfsplit.device.spec import DeviceError
from tfsplit.device.training import DeviceTrainer, TrainableHead
from tfsplit.device.training import bench as train_bench
from tfsplit.device.training import epoch_plan
from tfsplit.device.training import head as device_head
from tfsplit.device.training.plan import build_phases
from tfsplit.eval import device_parity
from tfsplit.export import trainable_export
from tfsplit.training import trainer
from tfsplit.training.config import load_config_file

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _smoke_config():
    config = load_config_file(os.path.join(REPO_ROOT, "configs", "deprune.py"), "smoke")
    config.data.augment = False  # TensorFlow's random crops cannot be drawn without it
    return config


_serve = device_parity.serve  # a training server of a config on 127.0.0.1, and its client


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke config's data as fixed batches, and its starting model, exported once."""
    return device_parity.prepare(_smoke_config(), str(tmp_path_factory.mktemp("smoke") / "head"))


def test_the_first_step_through_the_server_trains_the_same_head(smoke):
    runs = device_parity.train_both(smoke, smoke.train[:1])
    for got, want, name in runs.head_pairs():
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)


def test_steps_on_the_same_gradients_train_the_same_head(smoke):
    """Four steps (an epoch of four batches), the LiteRT device trained on the gradients the
    server sent the Keras device: momentum, Adam's later steps, batch norm's moving averages,
    the schedule's rates and the calibration agree to float tolerance, every step, when the wire
    and the tail do not come between them. Over the smoke config's whole 8-step epoch the gates'
    Adam steps of 6.25 logits take such 1e-7 differences to 1.6e-4 (docs/device-training.md)."""
    runs = device_parity.train_both(smoke, smoke.train[:4], same_gradients=True)
    assert sorted(runs.litert_log.steps) == [0, 1, 2, 3]  # served, on the Keras run's gradients
    for got, want, name in runs.head_pairs():
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)


def test_an_epoch_sends_the_same_bytes_and_ends_as_close_as_the_wire_allows(smoke):
    """A whole epoch: every message the same size, and the same accuracy. The weights drift
    apart by more than float tolerance: a few of the activations, which the two runtimes sum in a
    different order, round to another float16 on the wire, and a ReLU or max pool in the tail
    switches on them (docs/device-training.md#how-close-the-two-devices-are)."""
    runs = device_parity.train_both(smoke, smoke.train)
    history, summary = runs.history, runs.summary
    for key in ("payload_bytes_up", "payload_bytes_down", "wire_bytes_up", "wire_bytes_down"):
        assert summary[f"final_{key}"] == history[key][0], key
        assert summary[f"final_val_{key}"] == history[f"val_{key}"][0], key
    assert abs(summary["final_val_accuracy"] - history["val_accuracy"][0]) <= 0.05
    assert abs(summary["final_accuracy"] - history["accuracy"][0]) <= 0.05
    assert runs.relative_distance() < 0.05


def test_a_nudge_moves_one_value_by_one_float32_step():
    """What the parity benchmark's sensitivity runs start both devices from."""
    weights = np.array([0.5, -2.0, 0.0], np.float32)
    got = device_parity.nudged(weights, 1)
    assert got[1] == np.nextafter(np.float32(-2.0), np.float32(np.inf)) and got[1] > -2.0
    assert got[0] == 0.5 and got[2] == 0.0 and weights[1] == -2.0  # a copy: the input is kept


def test_epoch_plan_follows_the_phase_schedule(smoke):
    """The plan the device follows is what `PhaseSchedule` sets on the Keras model, epoch by
    epoch (budget, rates, penalty, nesting)."""
    config = load_config_file(os.path.join(REPO_ROOT, "configs", "deprune.py"), "smoke,grow")
    config.budget_sampling.nested = True
    split = trainer.build_split_model(config, smoke.info)
    run = trainable_export.run_description(split, config)
    phases = build_phases(run)
    schedule = callbacks_lib.PhaseSchedule(
        config.phases, seed=0, gate_travel_fraction=config.optimizer.gate_travel_fraction
    )
    schedule.set_model(split)
    schedule.set_params(dict(steps=7))
    schedule.on_train_begin()
    for epoch in range(schedule.epochs):
        schedule.on_epoch_begin(epoch)
        plan = epoch_plan(run, phases, epoch, 7)
        assert plan["budget"] == int(split.budget.numpy())
        assert np.float32(plan["learning_rate"]) == np.float32(split.optimizer.learning_rate)
        assert np.float32(plan["gate_learning_rate"]) == np.float32(
            split.gate_optimizer.learning_rate
        )
        assert np.float32(plan["penalty_weight"]) == np.float32(split.penalty_weight.numpy())
        assert plan["nesting"] == bool(split.step_nesting.numpy())


def test_a_warm_up_changes_no_weight_and_trains_as_before(smoke):
    """The warm-up's calls leave the head as it was: a step after it equals a step without."""
    images, labels = smoke.train[0]
    heads = [TrainableHead(smoke.head), TrainableHead(smoke.head)]
    before = heads[0].get_weights()
    heads[0].warm_up(len(labels), heads[0].run["channels"])
    np.testing.assert_array_equal(heads[0].get_weights(), before)
    for head in heads:
        values, _, _ = head.forward(images, 4)
        head.train(images, labels, np.ones_like(values), 4, (0.05, 0.05), 0.01)
    np.testing.assert_array_equal(heads[0].get_weights(), heads[1].get_weights())


def test_bad_model_files_are_refused_in_one_line(smoke, tmp_path):
    head_dir = tmp_path / "head"
    shutil.copytree(smoke.head, head_dir)
    model = head_dir / device_head.MODEL_FILE
    original = model.read_bytes()
    model.write_bytes(original[: len(original) // 3])
    with pytest.raises(DeviceError, match="not a loadable trainable head|not a TFLite"):
        TrainableHead(str(head_dir))
    model.write_bytes(b"\0" * 64)
    with pytest.raises(DeviceError, match="not a TFLite model"):
        TrainableHead(str(head_dir))
    model.write_bytes(original)
    layout = head_dir / device_head.LAYOUT_FILE
    text = layout.read_text()
    layout.write_text(text.replace('"size": ', '"size": 1', 1))
    with pytest.raises(DeviceError, match="size|variables"):
        TrainableHead(str(head_dir))
    layout.write_text(text)
    head = TrainableHead(str(head_dir))
    with pytest.raises(DeviceError, match="float32 values"):
        head.set_weights(np.zeros(3, np.float32))


def test_a_head_of_another_model_is_refused_by_the_server(smoke):
    head_dir = smoke.head
    other = _smoke_config()
    other.model.width_multiplier = 0.25
    server, client = _serve(other)
    try:
        device = DeviceTrainer(TrainableHead(str(head_dir)), client)
        with pytest.raises(Exception, match="digest|model"):
            device.connect()
    finally:
        server.stop(0)


def test_the_device_trainer_imports_no_tensorflow():
    code = (
        "import sys; sys.modules['tensorflow'] = None; sys.modules['tf_keras'] = None\n"
        "import tfsplit.device.training as t; print(t.DeviceTrainer.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]


# --------------------------------------------------------------------------- the tool
TOOL = (
    "import sys\n"
    "sys.modules['tensorflow'] = None  # the device has no TensorFlow\n"
    "sys.modules['tf_keras'] = None\n"
    "sys.argv[0] = 'tfsplit-device-train'\n"
    "from tfsplit_tools import cli\n"
    "cli.main()\n"
)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """Smoke shards (2 per split), the trainable head of a new run on them (a save every 3
    steps) and a server of the same config on 127.0.0.1."""
    root = tmp_path_factory.mktemp("deployed")
    shards_dir = str(root / "shards")
    shard_writer.write_shards("synthetic", shards_dir, num_shards=2, train_size=256, test_size=128)
    config = _smoke_config()
    config.data.name, config.data.path = "shards", shards_dir
    config.data.train_size = config.data.test_size = 0
    config.checkpoint_every_steps = 3
    head_dir = str(root / "head")
    trainable_export.export_trainable_start(config, head_dir)
    server, client = _serve(config, str(root / "server"))  # it goes back with the device
    client.close()
    yield types.SimpleNamespace(
        root=root, shards=shards_dir, head=head_dir, server=client.address, config=config
    )
    server.stop(0)


def _tool(deployed, workdir, *flags):
    argv = [
        sys.executable, "-c", TOOL, f"--model_dir={deployed.head}", f"--data={deployed.shards}",
        f"--server={deployed.server}", f"--workdir={workdir}", *flags,
    ]  # fmt: skip
    return subprocess.Popen(
        argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_the_tool_trains_without_tensorflow_and_resumes_after_kill_9(deployed, tmp_path):
    """Killed after its first save and started again, the device (and the server, which goes
    back with it) ends as the same run uninterrupted: its batches are a function of the epoch,
    and the resumed epoch skips those already trained."""
    workdir = tmp_path / "device"
    first = _tool(deployed, workdir)
    state = workdir / "device_state.npz"
    deadline = time.monotonic() + 120
    while not state.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    first.kill()  # kill -9 after its first save (3 steps in)
    first.communicate(timeout=30)
    assert state.exists()
    with np.load(state) as saved:
        saved_step = json.loads(str(saved["state"]))["remote_step"]
    second = _tool(deployed, workdir)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-3000:]
    assert "Trained 2 epochs" in out
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["budget"] for r in records] == [8, 32]
    with np.load(state) as saved:
        final = json.loads(str(saved["state"]))
    assert final["remote_step"] == 16 and saved_step >= 3  # 8 steps an epoch; none trained twice
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["train_payload_bytes_up"] == sum(r["payload_bytes_up"] for r in records)

    server, client = _serve(deployed.config, str(tmp_path / "server"))
    alone = types.SimpleNamespace(head=deployed.head, shards=deployed.shards, server=client.address)
    try:
        whole = _tool(alone, tmp_path / "whole")
        _, err = whole.communicate(timeout=300)
        assert whole.returncode == 0, err[-3000:]
        written = (tmp_path / "whole" / "summary.json").read_text()
        again = _tool(alone, tmp_path / "whole")  # a finished run started again keeps its summary
        _, err = again.communicate(timeout=300)
        assert again.returncode == 0, err[-3000:]
    finally:
        client.close()
        server.stop(0)
    assert (tmp_path / "whole" / "summary.json").read_text() == written
    uninterrupted = json.loads(written)
    keys = (
        "final_val_accuracy",
        "final_test_accuracy",
        "final_test_loss",
        "train_payload_bytes_up",
    )
    for key in keys:
        assert summary[key] == uninterrupted[key], key
    with np.load(state) as resumed, np.load(tmp_path / "whole" / state.name) as straight:
        np.testing.assert_array_equal(resumed["weights"], straight["weights"])  # bit for bit


@pytest.mark.parametrize("damage", ["shard", "model", "layout"])
def test_the_tool_refuses_bad_input_in_one_line(deployed, tmp_path, damage):
    target = tmp_path / "copy"
    shutil.copytree(deployed.root, target, ignore=shutil.ignore_patterns("device*"))
    if damage == "shard":
        shard = target / "shards" / "train-00001-of-00002.tfrecord"
        data = bytearray(shard.read_bytes())
        data[100] ^= 0xFF
        shard.write_bytes(bytes(data))
        expected = "sha256"
    elif damage == "model":
        model = target / "head" / device_head.MODEL_FILE
        model.write_bytes(model.read_bytes()[:5000])
        expected = "trainable head"
    else:
        (target / "head" / device_head.LAYOUT_FILE).write_text('{"size": 3}')
        expected = "variables"
    copy = types.SimpleNamespace(
        shards=str(target / "shards"), head=str(target / "head"), server=deployed.server
    )
    process = _tool(copy, tmp_path / "device")
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2, err[-2000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and expected in lines[0], err[-2000:]


def test_the_trainable_step_is_timed_and_the_installs_are_sized(deployed):
    rows = train_bench.bench_trainable(deployed.head, batch_sizes=(1, 4), runs=2, warmup=1)
    assert [row["batch"] for row in rows] == [1, 4]
    for row in rows:
        assert 0 < row["forward_ms"] < row["step_ms"]
        assert row["step_ms_per_sample"] == pytest.approx(row["step_ms"] / row["batch"])
    litert = train_bench.install_size_mib(train_bench.LITERT_DEVICE)
    keras = train_bench.install_size_mib(train_bench.KERAS_DEVICE)
    assert 0 < train_bench.install_size_mib(["numpy"]) < litert < keras
    assert train_bench.install_size_mib(["no-such-distribution"]) == 0


def test_the_bench_tool_times_the_trainable_head_into_a_new_directory(deployed, tmp_path):
    """`tfsplit-bench-head --trainable` without TensorFlow, its --out made as the other mode's."""
    out = tmp_path / "new" / "results"
    argv = [
        sys.executable, "-c", TOOL.replace("tfsplit-device-train", "tfsplit-bench-head"),
        "--trainable", f"--export_dir={deployed.head}", "--runs=1", "--warmup=0", f"--out={out}",
    ]  # fmt: skip
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads((out / "bench_head_trainable.json").read_text())
    assert [row["batch"] for row in written["rows"]] == list(train_bench.BATCH_SIZES)
    assert written["memory"]["litert_process_peak_mib"] > 0
