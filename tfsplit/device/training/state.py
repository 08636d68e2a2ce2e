"""The device trainer's saved state: the head's weight vector (optimizer state included) and where
the run is (step ids, phase, epoch and batch, the byte ledger), in one file replaced whole."""

import json
import os

import numpy as np

from tfsplit.device.spec import DeviceError

STATE_FILE = "device_state.npz"


def save_state(workdir, weights, state):
    """Writes `weights` and the `state` dict to `workdir`, through a partial file and a rename."""
    path = os.path.join(workdir, STATE_FILE)
    with open(path + ".partial", "wb") as f:
        np.savez(f, weights=weights, state=np.array(json.dumps(state)))
    os.replace(path + ".partial", path)


def load_state(workdir, digest):
    """(weights, state) saved in `workdir` for the model `digest`, or None when none was saved.

    Raises:
      DeviceError: a file this trainer did not write, or the state of another model.
    """
    path = os.path.join(workdir, STATE_FILE)
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as saved:
            weights, state = saved["weights"], json.loads(str(saved["state"]))
    except (OSError, ValueError, KeyError) as error:
        raise DeviceError(f"{path} is not a device state this trainer wrote: {error}") from None
    if state.get("model_digest") != digest:
        raise DeviceError(
            f"{path} holds the state of another model (digest "
            f"{str(state.get('model_digest'))[:16]}...); train into a new workdir."
        )
    return weights, state
