"""How much of the labels leaks to the party without them: the norm and cosine (direction) attacks
of Li et al., "Label Leakage and Protection in Two-party Split Learning" (ICLR 2022).

What the server sees of each training sample, per split (`observed`):
- plain split: the gradient of the loss at the cut (`cut_gradient`), which the server computes
  and sends down; it is what the attacks read in the paper's setting;
- U-shaped split: the gradient that the device's top sends up (`top_gradient`), and the first
  cut's activations (`activations`).

Each gradient is seen as it is sent: with the model's defence (`gradient_noise`,
`top_gradient_noise`: Gaussian noise at a set level, `tfsplit.codec.wire.perturb`) applied.

The norm attack scores a sample by its row's L2 norm; the cosine attack by its row's cosine with
the row of one sample whose label the attacker knows. Each score's ROC AUC against the labels
says how well it separates them: 0.5 is chance, 1 (or 0) gives the labels away. With more than
two classes each class is one against the rest (the cosine's known sample is one of that class)
and the AUCs are averaged. The AUC is the attacker's best of the score and its negation, so it is
never below 0.5.
"""

import numpy as np
import tensorflow as tf
import tf_keras as keras

from tfsplit.codec import wire
from tfsplit.engine.ushaped import UShapedSplitModel


def auc(scores, positives):
    """ROC AUC of `scores` for the boolean `positives` (Mann-Whitney, ties counted half)."""
    scores = np.asarray(scores, np.float64)
    positives = np.asarray(positives, bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if not n_pos or not n_neg:
        raise ValueError(
            f"An AUC needs both positives and negatives. Received: {n_pos} and {n_neg}"
        )
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over ties: each run of equal scores gets the mean of its positions.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return (ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _best(value):
    return max(value, 1.0 - value)


def norm_attack_auc(rows, labels):
    """The norm attack's AUC: rows (N, D) scored by their L2 norm, averaged one-vs-rest."""
    norms = np.linalg.norm(rows, axis=1)
    return _per_class(labels, lambda positives: _best(auc(norms, positives)))


def cosine_attack_auc(rows, labels, seed=0):
    """The cosine attack's AUC: each class's rows scored by their cosine with the row of one
    sample of that class (drawn with `seed`, left out of the scoring), averaged one-vs-rest."""
    rng = np.random.default_rng(seed)
    unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)

    def one_class(positives):
        known = rng.choice(np.flatnonzero(positives))
        others = np.arange(len(rows)) != known
        return _best(auc(unit[others] @ unit[known], positives[others]))

    return _per_class(labels, one_class)


def _per_class(labels, score):
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError(f"The attacks need at least two classes. Received: {classes.tolist()}")
    if len(classes) == 2:  # binary: one AUC, the second class the positive one
        return float(score(labels == classes[1]))
    return float(np.mean([score(labels == c) for c in classes]))


def observed(split, images, labels):
    """{name: (N, D) float32 rows} of what the server sees of one training batch of `split` at
    its budget in force: see the module docstring. Batch norm uses the batch's statistics, as
    in a training step; nothing is updated."""
    images, labels = tf.convert_to_tensor(images), tf.convert_to_tensor(labels)
    indices = split.channel_indices()
    with tf.GradientTape(persistent=True) as tape:
        values, _, _ = split.device_step(images, labels, indices)
        sent = split.wire(values)
        tape.watch(sent)
        if isinstance(split, UShapedSplitModel):
            middle = split.middle_output(sent, indices, training=True)
            tape.watch(middle)
            logits = split.top(split.top_wire(middle), training=True)
        else:
            logits = split.receive(sent, indices, training=True)
        loss = split.compute_loss(images, labels, logits)
    flat = lambda t: tf.reshape(t, [tf.shape(t)[0], -1]).numpy()  # noqa: E731
    if isinstance(split, UShapedSplitModel):
        top_gradient = wire.perturb(tape.gradient(loss, middle), split.top_gradient_noise)
        return dict(top_gradient=flat(top_gradient), activations=flat(sent))
    return dict(cut_gradient=flat(wire.perturb(tape.gradient(loss, sent), split.gradient_noise)))


ATTACKS = {"norm": norm_attack_auc, "cosine": cosine_attack_auc}


def attack_aucs(split, batches, seed=0):
    """{"<what is seen>_<attack>": AUC} over `batches` ((images, labels) pairs): every attack on
    everything the server of `split` sees (`observed`)."""
    rows, labels = {}, []
    for images, batch_labels in batches:
        for name, seen in observed(split, images, batch_labels).items():
            rows.setdefault(name, []).append(seen)
        labels.append(np.asarray(batch_labels))
    labels = np.concatenate(labels)
    return {
        f"{name}_{attack}": fn(
            np.concatenate(parts), labels, **({"seed": seed} if attack == "cosine" else {})
        )
        for name, parts in rows.items()
        for attack, fn in ATTACKS.items()
    }


class LeakageProbe(keras.callbacks.Callback):
    """Runs the attacks at each epoch's end on fixed `batches` and adds each AUC to the logs as
    "leakage_<what is seen>_<attack>" (`RunRecords` writes them to metrics.jsonl)."""

    def __init__(self, batches, seed=0):
        super().__init__()
        self.batches, self.seed = list(batches), seed

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        aucs = attack_aucs(self.model, self.batches, self.seed)
        logs.update({f"leakage_{key}": value for key, value in aucs.items()})
