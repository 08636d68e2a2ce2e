"""A model's random layers (dropout, noise), and their draws as state that a checkpoint keeps.

Keras's random layers draw from generators that no checkpoint holds (on purpose, for
compatibility), so a run that goes back to a checkpoint draws other masks than it drew the first
time. A run must go back exactly: a training run resumed from its backup (`BackupAndRestore`
keeps the generators as the model's `dropout_draws`), and the split training server, which a
device restored from its backup takes back to its step (the checkpoint, then the logged steps
trained again), go on as if they had never stopped.
"""

import tf_keras as keras

RANDOM_LAYERS = (
    keras.layers.Dropout,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
)


def random_layers(model):
    """The layers of `model` (nested models' included) that draw at random in training."""
    return [
        layer
        for layer in model.submodules
        if isinstance(layer, keras.layers.Layer) and isinstance(layer, RANDOM_LAYERS)
    ]


def checkpointed_draws(model, seed):
    """Has each random layer of `model` draw from a `tf.random.Generator` of its own, seeded
    from `seed` and the layer's position (a layer given one before keeps it), and returns those
    generators, for the caller's checkpoint to keep. Call it before the model's first compiled
    call (a trace keeps the draws it found)."""
    generators = []
    for number, layer in enumerate(random_layers(model)):
        drawer = layer._random_generator
        if getattr(drawer, "_generator", None) is None:  # not given a generator before
            # Keras's own RandomGenerator, in its tf.random.Generator mode: the layers' code
            # stays Keras's; only where the draws come from changes.
            drawer = type(drawer)(seed * 1000 + number, rng_type="stateful")
            drawer._maybe_init()
            layer._random_generator = drawer
        generators.append(drawer._generator)
    return generators


def states(generators):
    """The variables that hold `generators`' positions (to keep and put back)."""
    return [generator.state for generator in generators]
