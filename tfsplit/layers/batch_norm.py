"""Batch norm statistics averaged over forward passes: the calibration both halves run."""

import contextlib

import tf_keras as keras


def norms_of(model):
    """`model`'s batch norm layers, nested ones included."""
    return [m for m in model.submodules if isinstance(m, keras.layers.BatchNormalization)]


@contextlib.contextmanager
def zero_momentum(norms):
    """Inside, every norm's momentum is 0: a training-mode pass leaves exactly its batch's
    statistics. Momentum is a Python attribute, read when a pass runs eagerly and when a
    `tf.function` is traced: a compiled calibration pass must be traced inside."""
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum


class BatchNormAverage:
    """The plain mean of batch norm statistics over forward passes (`calibrate_batch_norm`).

    Inside `with`, every norm's momentum is 0, so each training-mode pass leaves exactly its
    batch's statistics; `record` adds them up after each pass, and leaving the block assigns the
    means (E[x] and E[x^2] - E[x]^2) and restores the momenta. An exception leaves the
    statistics of the last pass and restores the momenta.
    """

    def __init__(self, norms):
        self.norms = list(norms)
        self.count = 0

    @classmethod
    def of(cls, model):
        """The averager of `model`'s batch norms, or None when it has none."""
        norms = norms_of(model)
        return cls(norms) if norms else None

    def __enter__(self):
        self._zero_momentum = zero_momentum(self.norms)
        self._zero_momentum.__enter__()
        self._means, self._squares, self.count = [0.0] * len(self.norms), [0.0] * len(self.norms), 0
        return self

    def record(self):
        for i, norm in enumerate(self.norms):
            mean = norm.moving_mean.numpy()
            self._means[i] = self._means[i] + mean
            self._squares[i] = self._squares[i] + norm.moving_variance.numpy() + mean * mean
        self.count += 1

    def __exit__(self, error_type, error, traceback):
        self._zero_momentum.__exit__(None, None, None)
        if error_type is not None:
            return False
        if not self.count:
            raise ValueError("Batch norm calibration needs at least one batch; none was given.")
        for norm, total, total_square in zip(self.norms, self._means, self._squares):
            mean = total / self.count
            norm.moving_mean.assign(mean)
            norm.moving_variance.assign(total_square / self.count - mean * mean)
        return False
