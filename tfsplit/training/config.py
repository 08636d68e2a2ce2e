"""The one config schema every experiment file in configs/ fills in.

Every key the trainer reads is here, with its meaning; experiment files change values, never add
hidden defaults. A config file's `get_config(arg)` takes a variant: "" (the default, a few minutes
on the embedded dataset) or comma-separated names, all applied, e.g. `deprune.py:hard,smoke`.
Every file offers these generic ones (a file may add its own schedules, applied before them):

  paper: the research code's VGG-11 and CIFAR-10 (with the file's reference schedule); a GPU.
  hard: the harder embedded dataset "synthetic_hard" (80 classes, same 32x32x3 images), trained
    with the local classifier below at half weight (`hard,local`: at full weight).
  small: the small-data setting: 1500 training images, every phase five times as many epochs.
  local: a device-side classifier's loss for the head (`model.local_loss_weight` 1; no bytes).
  ushaped: the U-shaped split: the classifier and the loss stay on the device with the labels.
  smoke: seconds (1 epoch a phase, 256 training images, width 1/8); used by the tests.
"""

import importlib.util
import os

import ml_collections

# The generic variants, in the order they are applied whatever order they are given in: smoke
# last, so that it shrinks whatever the others chose.
GENERIC_VARIANTS = ("paper", "hard", "small", "local", "ushaped", "smoke")
VARIANTS = ("",) + GENERIC_VARIANTS  # what every config file accepts alone; "" = the default.
# Variants that each set the same key differently; together they would silently drop one.
_CONFLICTS = ({"hard", "paper"},)
SMALL_EPOCH_FACTOR = 5


# The research code's learning-rate boost after a reset (SGD 5e-2).
BOOST_LEARNING_RATE = 0.05


def phase(
    budget,
    epochs,
    learning_rate,
    boost_learning_rate=None,
    boost_epochs=0,
    anneal_epochs=0,
    reset="none",
    reset_threshold=0.9,
    reset_range=3.0,
):
    """One schedule entry; budget 0 = all channels, no masking. See `tfsplit.engine.budget.Phase`.

    boost_learning_rate defaults to BOOST_LEARNING_RATE with boost epochs and to 0 without.
    """
    if boost_learning_rate is None:
        boost_learning_rate = BOOST_LEARNING_RATE if boost_epochs else 0.0
    return ml_collections.ConfigDict(locals())  # the arguments, by name


def base_config(mode):
    """Defaults shared by all methods: embedded dataset, VGG-11 at width 1/4 cut after conv 5."""
    config = ml_collections.ConfigDict()
    config.mode = mode  # "sl", "casl", "deprune" or "prune": recorded in summary.json.
    config.seed = 0
    config.init_from = ""  # workdir of an earlier run whose weights start this one (prune).
    # Back up the whole training state every this many steps; a killed run resumes from there.
    config.checkpoint_every_steps = 100
    # Against a parallel-mode server: the devices average their heads every this many training
    # steps (0 = after every epoch's last training batch).
    config.average_every_steps = 0
    # Before each evaluation whose sent channels (or their gates) changed since the last one, batch
    # norm statistics are recomputed over this many training batches (0 = never).
    config.calibration_batches = 20

    # Data.
    config.data = ml_collections.ConfigDict()
    # "synthetic" or "synthetic_hard" (embedded), "cifar10", "cifar100", "fashion_mnist", "stl10",
    # "image_folder", or "shards" (TFRecord shards written by tfsplit-prepare-data, streamed).
    config.data.name = "synthetic"
    # Local copy: CIFAR python archive (.tar.gz or extracted), Fashion-MNIST IDX folder, STL-10
    # binary archive or folder, image-folder root (train/<class>/, val/<class>/), the shards'
    # directory or s3://bucket/prefix (endpoint and credentials from the standard AWS_* variables
    # and ~/.aws files); "" = download.
    config.data.path = ""
    # This device's part of the training set: device shard_index of num_shards trains on every
    # num_shards-th shard file (shards) or sample (in memory); the test set is not split.
    config.data.shard_index = 0
    config.data.num_shards = 1
    config.data.cache = (
        False  # shards, image folders: decode this device's part once, train from memory.
    )
    # shards: a tf.data service dispatcher ("grpc://host:port") whose workers read and decode the
    # shards when this machine's CPUs cannot keep up; "" = decode here.
    config.data.service_address = ""
    # s3:// shards: keep each verified shard in this local directory and read it from there on
    # later epochs and runs; "" = stream every epoch from the bucket.
    config.data.local_cache_dir = ""
    config.data.image_size = 0  # 0 = the dataset's own (32; STL-10 96; image folders 64).
    config.data.channels = 0  # 0 = the dataset's own; 3 repeats Fashion-MNIST's gray channel.
    config.data.train_size = 0  # 0 = the whole training set.
    config.data.test_size = 0
    # Held out of the training set (seeded): every epoch's evaluation, target and choice is made
    # on it; the test set is evaluated once, at the end. Shards hold the split they were written
    # with (tfsplit-prepare-data --validation_fraction), which must be this one.
    config.data.validation_fraction = 0.1
    config.data.batch_size = 64
    config.data.eval_batch_size = 500
    config.data.augment = True  # random crop (4-pixel padding) + horizontal flip.
    # >= 0: the binary task "this class or another" (labels 1 / 0; in process), -1: every class.
    config.data.binary_class = -1

    # Model: backbone, cut and the masked bottleneck.
    config.model = ml_collections.ConfigDict()
    config.model.backbone = "vgg11"
    config.model.width_multiplier = 0.25
    config.model.classifier = "cifar"  # global pool + dense; "imagenet": the research code's.
    config.model.cut = "conv5"  # 128 channels at 4x4 for 32x32 input at width 0.25.
    config.model.bottleneck = ml_collections.ConfigDict()
    config.model.bottleneck.enabled = True
    config.model.bottleneck.feature_compression = 1  # C' = C / feature_compression.
    config.model.bottleneck.resolution_compression = 1  # encoder stride.
    config.model.bottleneck.gate_init_max = 15.0  # gate logits start uniform in [0, this].
    # > 0: a classifier on the device's features at the cut adds its loss, times this, to the
    # head's (tfsplit.layers.local_classifier): no bytes, a faster start (docs/method.md); 0 = none.
    config.model.local_loss_weight = 0.0
    # U-shaped split learning: "" = the plain split (the server computes the loss, so the labels go
    # up with every batch); "classifier", "last_block" (`tfsplit.backbones.TOP_POINTS`) or a cut
    # name: the layers after it (the top) and the loss stay on the device with the labels.
    config.model.top = ""

    # Schedule: a list of phases (see `phase`).
    config.phases = [phase(budget=0, epochs=1, learning_rate=0.01)]

    # One model for every budget (the sandwich rule with in-place distillation): each masked step
    # also trains the top ceil(k * min_fraction) channels and a random budget in between.
    config.budget_sampling = ml_collections.ConfigDict()
    config.budget_sampling.nested = False
    config.budget_sampling.min_fraction = 0.125

    # Budget loss eps * (exp(delta*(sum(m)-k)) + exp(-delta*(sum(m)-k))).
    config.budget_loss = ml_collections.ConfigDict()
    config.budget_loss.eps = 1000.0
    config.budget_loss.delta = 0.1
    # Weight of sum(m * (1 - m)) in masked phases: pushes each gate fully open or closed.
    config.budget_loss.polarization = 0.01

    # Optimizer: SGD; weight decay is decoupled (tf_keras SGD), 0 = none.
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 5e-4
    # Gate logits: "adam" (bounded steps, see tfsplit.training.build_gate_optimizer) at
    # gate_learning_rate, or "shared" (the SGD above, as the reference code does).
    config.optimizer.gate_optimizer = "adam"
    config.optimizer.gate_learning_rate = 0.05
    # > 0: in each masked phase the gates' Adam rate is set so that a gate can cross from fully
    # open to undecided within this fraction of the phase, whatever the steps per epoch.
    config.optimizer.gate_travel_fraction = 0.3
    # The gates' Adam beta_2: its second moment remembers the budget loss's huge first gradients
    # for about 1 / (1 - beta_2) steps, and while it does every gate step is tiny.
    config.optimizer.gate_beta_2 = 0.9

    # Wire: what crosses the cut, and how it is carried.
    config.wire = ml_collections.ConfigDict()
    config.wire.activation_dtype = "float16"  # "float32", "float16" or "int8".
    config.wire.gradient_dtype = "float16"
    config.wire.top_activation_dtype = "float16"  # U-shaped: the middle's output, down.
    config.wire.top_gradient_dtype = "float16"  # U-shaped: the top's gradient, up.
    # A label-leakage defence (in process): Gaussian noise of this many times the gradient's root
    # mean square on the gradient sent down at the cut, and on the top's sent up (U-shaped).
    config.wire.gradient_noise = 0.0
    config.wire.top_gradient_noise = 0.0
    config.wire.transport = "fused"  # "fused" (one compiled step) or "codec" (real bytes).
    return config


def parse_variants(arg, method_variants=()):
    """The names in a config argument such as "hard,smoke"; checked so that a typo fails loudly.

    Args:
      arg: None or "" for the default, else comma-separated variant names (order does not matter).
      method_variants: the names the calling config file handles itself, besides GENERIC_VARIANTS.

    Returns:
      frozenset of the names given.

    Raises:
      ValueError: naming an unknown, empty or repeated item, or two variants that conflict.
    """
    if arg is None or arg == "":
        return frozenset()
    allowed = tuple(method_variants) + GENERIC_VARIANTS
    if not isinstance(arg, str):
        raise ValueError(
            f"A config variant must be a string of comma-separated names from {allowed}. "
            f"Received: {arg!r}"
        )
    names = [name.strip() for name in arg.split(",")]
    for name in names:
        if not name:
            raise ValueError(
                f"Empty config variant in {arg!r}; expected comma-separated names from {allowed}."
            )
        if name not in allowed:
            raise ValueError(
                f"Unknown config variant {name!r} in {arg!r}; expected comma-separated names "
                f"from {allowed}."
            )
        if names.count(name) > 1:
            raise ValueError(f"Config variant {name!r} is repeated in {arg!r}; give it once.")
    for conflict in _CONFLICTS:
        if conflict <= set(names):
            raise ValueError(
                f"Config variants {sorted(conflict)} in {arg!r} set the same keys (the dataset) "
                "differently; give one of them."
            )
    return frozenset(names)


def apply_variant(config, variant, method_variants=()):
    """Applies the generic variants named in `variant`, in GENERIC_VARIANTS' order.

    Args:
      config: the file's config, its own variants (`method_variants`) already applied.
      variant: the config argument, e.g. "grow,smoke" (see `parse_variants`).
      method_variants: the names the calling config file offers and has handled; skipped here.

    Returns:
      `config`, changed in place.
    """
    names = parse_variants(variant, method_variants)
    for name in GENERIC_VARIANTS:
        if name in names:
            _APPLY[name](config)
    return config


def scale_epochs(config, factor):
    """Every phase of `config` trains `factor` times as many epochs, its boost and annealing
    included, so the schedule keeps its shape."""
    if not (isinstance(factor, int) and factor >= 1):
        raise ValueError(f"The epochs factor must be an integer >= 1. Received: {factor!r}")
    for entry in config.phases:
        for key in ("epochs", "boost_epochs", "anneal_epochs"):
            entry[key] *= factor


def _paper(config):
    config.data.name = "cifar10"
    config.data.batch_size = 16
    config.model.width_multiplier = 1.0
    config.model.classifier = "imagenet"
    config.optimizer.momentum = 0.0
    config.optimizer.weight_decay = 5e-4
    # The gates keep their own Adam here too: with the reference's shared SGD the budget loss
    # closes every gate within a few steps (measured); --config.optimizer.gate_optimizer=shared
    # runs the reference literally.


def _hard(config):
    config.data.name = "synthetic_hard"
    # Without a loss of its own the head starves on 80 classes: ten epochs end mid-climb, so the
    # comparisons measured how soon each run took off. At full weight (`hard,local`) the
    # classifier lifts every method but carries the cut so well that the budget matters
    # less; at half weight it matters again (measured: docs/results.md#hard-set-10-epochs and
    # docs/experiments.md#hard-set-without-the-local-classifier).
    config.model.local_loss_weight = 0.5


def _small(config):
    # 1500 training images and 1000 more held out for validation: a tenth of 1500 is too few
    # images to tell whether a run changes by less than a point at its end
    # (docs/experiments.md#small-data).
    config.data.train_size = 2500
    config.data.validation_fraction = 0.4
    # 23 steps an epoch: five times the epochs, so that runs end where they level off instead of
    # mid-climb, where the method that starts fastest wins (at three times every run was still
    # climbing and the masked methods ended below SL: docs/experiments.md#small-data).
    scale_epochs(config, SMALL_EPOCH_FACTOR)


def _local(config):
    config.model.local_loss_weight = 1.0


def _ushaped(config):
    config.model.top = "classifier"
    # Over the network the server holds the middle but not the top, which nested budgets'
    # distillation needs.
    config.budget_sampling.nested = False


def _smoke(config):
    config.data.train_size = 256
    config.data.test_size = 128
    config.data.batch_size = 32
    config.data.eval_batch_size = 128
    config.model.width_multiplier = 0.125
    for entry in config.phases:
        entry.epochs = 1
        entry.boost_epochs = min(entry.boost_epochs, 1)
        entry.anneal_epochs = 0


_APPLY = {
    "paper": _paper,
    "hard": _hard,
    "small": _small,
    "local": _local,
    "ushaped": _ushaped,
    "smoke": _smoke,
}


def load_config_file(path, variant=""):
    """`get_config(variant)` of a config file (e.g. "hard,smoke"), like `--config=path:variant`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No config file at {path}; expected a Python file with get_config()."
        )
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant or None)
