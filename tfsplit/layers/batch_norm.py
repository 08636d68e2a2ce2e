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


class StatisticsSum:
    """Batch norm statistics added up over passes, E[x] and E[x^2] per norm, apart from the
    layers: a server keeps one per device, so that devices calibrating at once stay apart."""

    def __init__(self):
        self.means, self.squares, self.count = None, None, 0

    def add(self, norms):
        """Adds what each of `norms` holds as its moving statistics now: exactly the batch's,
        after a training-mode pass at momentum 0 (`zero_momentum`)."""
        if self.means is None:
            self.means, self.squares = [0.0] * len(norms), [0.0] * len(norms)
        for i, norm in enumerate(norms):
            mean = norm.moving_mean.numpy()
            self.means[i] = self.means[i] + mean
            self.squares[i] = self.squares[i] + norm.moving_variance.numpy() + mean * mean
        self.count += 1

    def assign(self, norms):
        """Sets `norms`' moving statistics to the means: E[x] and E[x^2] - E[x]^2."""
        if not self.count:
            raise ValueError("Batch norm calibration needs at least one batch; none was given.")
        for norm, total, total_square in zip(norms, self.means, self.squares):
            mean = total / self.count
            norm.moving_mean.assign(mean)
            norm.moving_variance.assign(total_square / self.count - mean * mean)


class BatchNormAverage:
    """The plain mean of batch norm statistics over forward passes (`calibrate_batch_norm`).

    Inside `with`, every norm's momentum is 0, so each training-mode pass leaves exactly its
    batch's statistics; `record` adds them up after each pass, and leaving the block assigns the
    means and restores the momenta. An exception leaves the statistics of the last pass and
    restores the momenta.
    """

    def __init__(self, norms):
        self.norms = list(norms)
        self.sums = StatisticsSum()

    @classmethod
    def of(cls, model):
        """The averager of `model`'s batch norms, or None when it has none."""
        norms = norms_of(model)
        return cls(norms) if norms else None

    def __enter__(self):
        self._momenta = contextlib.ExitStack()
        self._momenta.enter_context(zero_momentum(self.norms))
        self.sums = StatisticsSum()
        return self

    def record(self):
        self.sums.add(self.norms)

    def __exit__(self, error_type, error, traceback):
        self._momenta.close()
        if error_type is None:
            self.sums.assign(self.norms)
        return False
