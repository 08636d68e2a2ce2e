"""Whether a device that restarted from its backup can take the run back to its step, and which
logged steps then train again."""

import grpc

from tfsplit.serving import validation
from tfsplit.training.messages import shown
from tfsplit.training.server.state import DeviceState


def replay_to(state, devices, device_id, step):
    """The logged step groups to train again after reloading the saved state, so that the run
    is where device `device_id` resumes (`step`); None when the tail is shared (other devices
    trained it since the checkpoint, or there is no saved state): it cannot go back, and the
    device continues from the server's step.

    Raises:
      RequestError: FAILED_PRECONDITION when the only device's run cannot reach `step` (no
        checkpoint yet, a step before the saved state, or one the log does not reach).
    """
    if len(devices) > 1 or state is None:
        return None
    if not state.exists():
        raise validation.RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"Device {shown(device_id)} resumes at step {step}, but this server has no "
            f"checkpoint yet to go back to (its next step here is "
            f"{devices[device_id].next_step}).",
        )
    saved, groups = state.saved_devices(), state.logged_steps()
    # Devices gone since the checkpoint trained the tail too: it cannot go back either.
    if set(saved) - {device_id} or any(
        r.device_id != device_id for g in groups for r in g.requests
    ):
        return None
    if device_id not in saved or saved[device_id].next_step > step:
        raise validation.RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"Device {shown(device_id)} resumes at step {step}, before the server's saved "
            f"state (step {saved.get(device_id, DeviceState()).next_step}).",
        )
    # The run's only device: one request per logged group.
    logged = [g for g in groups if g.requests[0].step < step]
    if saved[device_id].next_step + len(logged) != step:
        raise validation.RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"Device {shown(device_id)} resumes at step {step}, which the server's log does not "
            "reach.",
        )
    return logged
