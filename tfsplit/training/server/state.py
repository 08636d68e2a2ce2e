"""What a split training server keeps: per device in memory, and the run on disk (to restart)."""

import json
import os
import struct
import time

import tensorflow as tf

from tfsplit.protocol import split_training_pb2 as pb

# The step log holds every step since the last checkpoint, payloads included; past this size the
# server saves a checkpoint of its own (which empties the log) instead of waiting for the device.
MAX_LOG_BYTES = 1 << 30


class DeviceState:
    """What the server keeps per device: its next step id, its last reply and the digest of the
    request that got it (a retry must be the same request), when it last called (a silent device
    gives up its slot), the batch norm statistics of a calibration in progress and, for a
    U-shaped split, the step id and activations of its last FORWARD."""

    def __init__(self, next_step=0):
        self.next_step = next_step
        self.last_reply = None
        self.last_digest = None
        self.last_seen = time.monotonic()
        self.calibration = None  # a calibration in progress: its batch_norm.StatisticsSum
        self.forward = None  # (step, activations payload)
        self.forward_group = None  # the (device, step) FORWARDs it ran with, in order


class ServerState:
    """A server's durable state in its workdir: a checkpoint of the tail, its optimizer and its
    random generators (`draws`: the tail's dropout; the nested budgets') with every device's next
    step (`state.json`, written last), and a log of every training step since (`steps.log`:
    length-prefixed StepGroups, the steps trained as one batch, appended and flushed before the
    reply).

    After a kill, the checkpoint plus the replayed log give the state of the last step answered;
    a step killed before its log entry is redone by the device's retry.
    """

    def __init__(self, directory, split, draws=()):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        split.optimizer.build(split.tail.trainable_variables)
        self._checkpoint = tf.train.Checkpoint(
            tail=split.tail, optimizer=split.optimizer, draws=[split.budget_draws, *draws]
        )
        self._log_path = os.path.join(directory, "steps.log")
        self._json = os.path.join(directory, "state.json")
        self._log_file = open(self._log_path, "ab")
        self.log_bytes = self._log_file.tell()

    def exists(self):
        return os.path.exists(self._json)

    def save(self, devices):
        prefix = self._checkpoint.write(os.path.join(self.directory, f"tail-{time.time_ns()}"))
        old = self._read_json().get("checkpoint") if self.exists() else None
        state = dict(checkpoint=prefix, devices={d: v.next_step for d, v in devices.items()})
        with open(self._json + ".partial", "w") as f:
            json.dump(state, f)
        os.replace(self._json + ".partial", self._json)
        self.truncate_log()
        if old and old != prefix:
            for name in os.listdir(self.directory):
                if name.startswith(os.path.basename(old)):
                    os.remove(os.path.join(self.directory, name))

    def _read_json(self):
        with open(self._json) as f:
            return json.load(f)

    def saved_devices(self):
        """The devices the checkpoint recorded, with their next steps (nothing is restored)."""
        return {d: DeviceState(step) for d, step in self._read_json()["devices"].items()}

    def load(self):
        """Restores the checkpoint; returns the devices it recorded."""
        state = self._read_json()
        self._checkpoint.read(state["checkpoint"]).assert_existing_objects_matched()
        return {d: DeviceState(step) for d, step in state["devices"].items()}

    def log(self, group):
        """Appends `group` and flushes it; a failed write is cut off again, so that the log
        holds whole entries only and the step can change nothing."""
        data = group.SerializeToString()
        try:
            self._log_file.write(struct.pack("<Q", len(data)) + data)
            self._log_file.flush()
        except BaseException:
            try:
                self._log_file.truncate(self.log_bytes)
            except OSError:  # the disk refuses even that: the replay drops a torn last entry
                pass
            raise
        self.log_bytes += 8 + len(data)

    def logged_steps(self):
        """The logged StepGroups in order; a torn last entry (a kill mid-write) is dropped."""
        with open(self._log_path, "rb") as f:
            data = f.read()
        groups, offset = [], 0
        while offset + 8 <= len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            if offset + 8 + length > len(data):
                break
            groups.append(pb.StepGroup.FromString(data[offset + 8 : offset + 8 + length]))
            offset += 8 + length
        return groups

    def truncate_log(self):
        self._log_file.close()
        self._log_file = open(self._log_path, "wb")
        self.log_bytes = 0


SHAPES_FILE = "shapes.json"


def read_shapes(state_dir):
    path = os.path.join(state_dir, SHAPES_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        shapes = json.load(f)
    return tuple(shapes["image_shape"]), shapes["num_classes"]


def write_shapes(state_dir, image_shape, num_classes):
    os.makedirs(state_dir, exist_ok=True)
    with open(os.path.join(state_dir, SHAPES_FILE), "w") as f:
        json.dump(dict(image_shape=list(image_shape), num_classes=num_classes), f)
