"""The server's side of a device's batch norm calibration (`SplitModel.calibrate_batch_norm`)."""

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
        device.calibration = [0.0, 0.0, 0]
    elif device.calibration is None:
        raise validation.invalid("A calibration starts with calibration_begin.")
    saved = [(n.moving_mean.numpy(), n.moving_variance.numpy()) for n in norms]
    try:
        outputs = forward(values, indices, True)  # leaves exactly its batch's statistics
        means = [n.moving_mean.numpy() for n in norms]
        squares = [n.moving_variance.numpy() + m * m for n, m in zip(norms, means)]
    finally:
        for norm, (mean, variance) in zip(norms, saved):
            norm.moving_mean.assign(mean)
            norm.moving_variance.assign(variance)
    sums, sum_squares, passes = device.calibration
    device.calibration = [
        [a + b for a, b in zip(sums, means)] if passes else means,
        [a + b for a, b in zip(sum_squares, squares)] if passes else squares,
        passes + 1,
    ]
    if request.calibration_finish:
        sums, sum_squares, passes = device.calibration
        for norm, total, total_square in zip(norms, sums, sum_squares):
            mean = total / passes
            norm.moving_mean.assign(mean)
            norm.moving_variance.assign(total_square / passes - mean * mean)
        device.calibration = None
    return reply(request.step, outputs)
