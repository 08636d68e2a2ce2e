"""The server's side of a device's batch norm calibration (`SplitModel.calibrate_batch_norm`)."""

from tfsplit.layers import batch_norm
from tfsplit.serving import validation


def calibration_pass(norms, forward, reply, device, request, values, indices):
    """One pass of `device`'s calibration of the tail's batch `norms` (`forward(values, indices,
    True)` runs the tail's calibration pass, which leaves exactly its batch's statistics in the
    moving ones, as `CompiledTail.forward` does; `reply(step, outputs)` answers).

    Its batch's statistics are added up apart from other devices' and the moving statistics are
    left as they were; the last pass (`calibration_finish`) assigns the averages. Returns the
    pass's StepReply (the tail's outputs).
    """
    if request.calibration_begin:
        device.calibration = batch_norm.StatisticsSum()
    elif device.calibration is None:
        raise validation.invalid("A calibration starts with calibration_begin.")
    saved = [(n.moving_mean.numpy(), n.moving_variance.numpy()) for n in norms]
    try:
        outputs = forward(values, indices, True)  # leaves exactly its batch's statistics
        device.calibration.add(norms)
    finally:
        for norm, (mean, variance) in zip(norms, saved):
            norm.moving_mean.assign(mean)
            norm.moving_variance.assign(variance)
    if request.calibration_finish:
        device.calibration.assign(norms)
        device.calibration = None
    return reply(request.step, outputs)
