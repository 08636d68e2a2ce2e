"""What a split training server keeps: per device in memory, and the run on disk (to restart)."""

import json
import os
import struct
import time

import tensorflow as tf

from tfsplit.training import split_training_pb2 as pb


class DeviceState:
    """What the server keeps per device: its next step id, its last reply (for a retry) and
    the batch norm statistics of a calibration in progress."""

    def __init__(self):
        self.next_step = 0
        self.last_reply = None
        self.calibration = None  # [sums of E[x] per norm, sums of E[x^2] per norm, passes]


class ServerState:
    """A server's durable state in its workdir: a checkpoint of the tail and its optimizer with
    every device's next step (`state.json`, written last), and a log of every training step
    since (`steps.log`: length-prefixed StepGroups, the steps trained as one batch, appended and
    flushed before the reply).

    After a kill, the checkpoint plus the replayed log give the state of the last step answered;
    a step killed before its log entry is redone by the device's retry.
    """

    def __init__(self, directory, split):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        split.optimizer.build(split.tail.trainable_variables)
        self._checkpoint = tf.train.Checkpoint(tail=split.tail, optimizer=split.optimizer)
        self._log_path = os.path.join(directory, "steps.log")
        self._json = os.path.join(directory, "state.json")
        self._log_file = open(self._log_path, "ab")

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

    def load(self):
        """Restores the checkpoint; returns the devices it recorded."""
        state = self._read_json()
        self._checkpoint.read(state["checkpoint"]).assert_existing_objects_matched()
        devices = {}
        for device_id, next_step in state["devices"].items():
            devices[device_id] = DeviceState()
            devices[device_id].next_step = next_step
        return devices

    def log(self, group):
        data = group.SerializeToString()
        self._log_file.write(struct.pack("<Q", len(data)) + data)
        self._log_file.flush()

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
