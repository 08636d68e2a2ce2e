"""A model's random layers (dropout, noise), and their draws as state that a checkpoint keeps.

Keras's random layers draw from generators that no checkpoint holds (on purpose, for
compatibility), so a run that goes back to a checkpoint draws other masks than it drew the first
time. The split training server must go back exactly: a device restored from its backup takes the
run back to its step (the checkpoint, then the logged steps trained again), and the run must then
go on as if it had never stopped.
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
    from `seed` and the layer's position, and returns those generators, for the caller's
    checkpoint to keep. Call it before the model's first compiled call (a trace keeps the draws
    it found)."""
    generators = []
    for number, layer in enumerate(random_layers(model)):
        # Keras's own RandomGenerator, in its tf.random.Generator mode: the layers' code stays
        # Keras's; only where the draws come from changes.
        drawer = type(layer._random_generator)(seed * 1000 + number, rng_type="stateful")
        drawer._maybe_init()
        layer._random_generator = drawer
        generators.append(drawer._generator)
    return generators


def states(generators):
    """The variables that hold `generators`' positions (to keep and put back)."""
    return [generator.state for generator in generators]
