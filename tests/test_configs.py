"""Every file in configs/ loads, validates, and its smoke variant trains end to end."""

import glob
import importlib.util
import json
import os

import pytest
from absl import flags
from ml_collections import config_flags

import tfsplit  # noqa: F401
from tfsplit import callbacks
from tfsplit.training import config as config_lib
from tfsplit.training import train

CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
CONFIG_FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.py")))
# file -> the variants it offers besides config_lib.GENERIC_VARIANTS.
METHOD_VARIANTS = {
    "sl": (),
    "casl": (),
    "deprune": ("grow", "lean"),
    "prune": ("finetune", "steps"),
}
COMPOSED = {
    "sl": ["hard,smoke", "small,smoke", "small,paper", "local,hard,smoke"],
    "casl": ["hard,smoke", "small,smoke", "small,paper", "local,hard,smoke"],
    "deprune": [
        "hard,smoke",
        "small,smoke",
        "grow,smoke",
        "grow,paper",
        "grow,hard,small",
        "lean,hard",
        "local,hard,smoke",
    ],
    "prune": [
        "hard,smoke",
        "small,smoke",
        "steps,smoke",
        "steps,paper",
        "finetune,steps",
        "local,hard,smoke",
    ],
}


def load(path, arg=None):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def method(path):
    return os.path.basename(path)[:-3]


def schedule(config):
    """(budget, epochs, learning rate, boost rate, boost epochs, reset) of every phase."""
    return [
        (p.budget, p.epochs, p.learning_rate, p.boost_learning_rate, p.boost_epochs, p.reset)
        for p in config.phases
    ]


def test_the_four_methods_have_configs():
    names = {method(p) for p in CONFIG_FILES}
    assert {"sl", "casl", "deprune", "prune"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_variants_load_and_serialize(path):
    offered = config_lib.VARIANTS + METHOD_VARIANTS[method(path)]
    for arg in offered + tuple(COMPOSED[method(path)]):
        config = load(path, arg or None)
        assert config.mode == method(path)
        json.loads(config.to_json_best_effort())
    assert load(path, "paper").data.name == "cifar10"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_generic_variants_set_the_data_they_name(path):
    default = load(path)
    assert default.data.name == "synthetic" and default.data.train_size == 0
    hard = load(path, "hard")
    assert hard.data.name == "synthetic_hard" and hard.data.train_size == 0
    # The hard set trains with the local classifier at half weight; only deprune changes its
    # schedule.
    assert default.model.local_loss_weight == 0.0 and hard.model.local_loss_weight == 0.5
    if method(path) != "deprune":
        assert schedule(hard) == schedule(default)
    small = load(path, "small")
    assert small.data.name == "synthetic" and small.data.train_size == 2500
    assert small.data.validation_fraction == 0.4  # 1500 to train on, 1000 to validate on
    factor = config_lib.SMALL_EPOCH_FACTOR
    assert [(p.budget, p.epochs, p.boost_epochs, p.anneal_epochs) for p in small.phases] == [
        (p.budget, factor * p.epochs, factor * p.boost_epochs, factor * p.anneal_epochs)
        for p in default.phases
    ]
    both = load(path, "small,hard")
    assert (both.data.name, both.data.train_size) == ("synthetic_hard", 2500)
    assert load(path, "small,paper").data.train_size == 2500
    local = load(path, "local")
    assert local.model.local_loss_weight == 1.0 and local.data.name == "synthetic"
    assert schedule(local) == schedule(default)
    # `local` on the hard set restores full weight and changes nothing else.
    hard_local = load(path, "local,hard")
    assert hard_local.model.local_loss_weight == 1.0
    hard_local.model.local_loss_weight = 0.5
    assert hard_local.to_dict() == hard.to_dict()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_smoke_shrinks_every_composition_whatever_the_order(path):
    for arg in COMPOSED[method(path)]:
        names = arg.split(",")
        if "smoke" not in names:
            continue
        config = load(path, arg)
        assert load(path, ",".join(reversed(names))).to_dict() == config.to_dict()
        assert all(p.epochs == 1 and p.boost_epochs <= 1 for p in config.phases)
        assert config.data.train_size == 256 and config.model.width_multiplier == 0.125
    assert load(path, "hard,smoke").data.name == "synthetic_hard"


def test_deprune_schedules():
    path = os.path.join(CONFIG_DIR, "deprune.py")
    assert schedule(load(path)) == [
        (8, 18, 0.02, 0.0, 0, "none"),
        (32, 12, 0.02, 0.0, 0, "deprune"),
    ]
    assert load(path).phases[1].anneal_epochs == 9
    assert schedule(load(path, "paper")) == [
        (4, 25, 0.01, 0.0, 0, "none"),
        (16, 15, 0.01, 0.05, 3, "deprune"),
    ]
    # grow: the de-prune reset opens every channel (budget 0: no masking).
    assert schedule(load(path, "grow")) == [
        (4, 12, 0.02, 0.0, 0, "none"),
        (0, 8, 0.02, 0.05, 2, "deprune"),
    ]
    # lean: the first phase sends 4 channels; the schedules that already start at 4 are unchanged.
    assert schedule(load(path, "lean")) == [
        (4, 18, 0.02, 0.0, 0, "none"),
        (32, 12, 0.02, 0.0, 0, "deprune"),
    ]
    assert schedule(load(path, "lean,grow")) == schedule(load(path, "grow"))
    # hard: phase 1 at 16, where 8 starved the 80-class cut; lean and grow still start at 4.
    assert schedule(load(path, "hard")) == [
        (16, 18, 0.02, 0.0, 0, "none"),
        (32, 12, 0.02, 0.0, 0, "deprune"),
    ]
    assert schedule(load(path, "hard,lean"))[0][0] == 4
    assert schedule(load(path, "hard,grow")) == schedule(load(path, "grow"))
    assert schedule(load(path, "lean,paper")) == schedule(load(path, "paper"))
    grow_paper = load(path, "grow,paper")
    assert schedule(grow_paper) == [
        (4, 15, 0.01, 0.0, 0, "none"),
        (0, 7, 0.01, 0.05, 3, "deprune"),
    ]
    assert grow_paper.data.name == "cifar10" and grow_paper.model.width_multiplier == 1.0
    assert schedule(load(path, "grow,smoke")) == [
        (4, 1, 0.02, 0.0, 0, "none"),
        (0, 1, 0.02, 0.05, 1, "deprune"),
    ]


def test_prune_schedules():
    path = os.path.join(CONFIG_DIR, "prune.py")
    # No boost: a learning rate falling from 0.01 over the whole fine-tuning (all 6 epochs).
    default = load(path)
    assert schedule(default) == [(0, 30, 0.02, 0.0, 0, "none"), (32, 6, 0.01, 0.0, 0, "prune")]
    assert default.phases[1].anneal_epochs == 6
    paper = load(path, "paper")
    assert schedule(paper) == [(0, 20, 0.001, 0.0, 0, "none"), (16, 5, 0.01, 0.05, 2, "prune")]
    assert paper.optimizer.momentum == 0.9
    # steps: prune 32 -> 4, the second step without a reset.
    steps = [(32, 4, 0.02, 0.05, 2, "prune"), (4, 4, 0.02, 0.0, 0, "none")]
    assert schedule(load(path, "steps")) == [(0, 30, 0.02, 0.0, 0, "none")] + steps
    assert schedule(load(path, "finetune,steps")) == steps
    assert schedule(load(path, "steps,finetune")) == steps
    assert schedule(load(path, "finetune")) == [(32, 6, 0.01, 0.0, 0, "prune")]
    steps_paper = load(path, "steps,paper")
    assert schedule(steps_paper) == [
        (0, 30, 0.001, 0.0, 0, "none"),
        (32, 10, 0.01, 0.05, 2, "prune"),
        (4, 10, 0.01, 0.0, 0, "none"),
    ]
    assert steps_paper.optimizer.momentum == 0.9 and steps_paper.data.name == "cifar10"
    assert [p.budget for p in load(path, "steps,smoke").phases] == [0, 32, 4]


def test_variant_list_passes_through_the_config_flag():
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values)
    flag_values(["prog", f"--config={os.path.join(CONFIG_DIR, 'deprune.py')}:grow,hard,smoke"])
    config = flag_values.config
    assert config.data.name == "synthetic_hard"
    assert [(p.budget, p.epochs) for p in config.phases] == [(4, 1), (0, 1)]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_smoke_variant_trains(path, tmp_path):
    config = load(path, "smoke")
    summary = train(config, str(tmp_path))
    assert summary["epochs"] >= 1
    _assert_final_accuracy_is_the_last_epochs(summary, str(tmp_path), config)
    assert summary["train_payload_bytes_up"] > 0


def _assert_final_accuracy_is_the_last_epochs(summary, workdir, config):
    """The summary's validation accuracy is the last epoch's evaluation, a count of the held-out
    images; its test accuracy, evaluated once at the end, a count of the test images."""
    last = callbacks.read_records(workdir)[-1]
    assert summary["final_val_accuracy"] == last["val_accuracy"]
    held_out = round(config.data.train_size * config.data.validation_fraction)
    for key, count in (
        ("final_val_accuracy", held_out),
        ("final_test_accuracy", config.data.test_size),
    ):
        correct = summary[key] * count
        assert correct == pytest.approx(round(correct), abs=1e-3), key


@pytest.mark.parametrize("name, arg", [("deprune", "grow,smoke"), ("prune", "steps,smoke")])
def test_composed_smoke_variant_trains(name, arg, tmp_path):
    config = load(os.path.join(CONFIG_DIR, f"{name}.py"), arg)
    summary = train(config, str(tmp_path))
    assert summary["epochs"] == len(config.phases)
    # grow ends with every channel open; steps at budget 4.
    assert summary["final_budget"] == (summary["channels"] if name == "deprune" else 4)
    _assert_final_accuracy_is_the_last_epochs(summary, str(tmp_path), config)
    assert summary["train_payload_bytes_up"] > 0


def test_scaling_epochs_keeps_the_schedules_shape_and_refuses_a_bad_factor():
    config = config_lib.load_config_file(os.path.join(CONFIG_DIR, "deprune.py"))
    before = [(p.epochs, p.boost_epochs, p.anneal_epochs) for p in config.phases]
    config_lib.scale_epochs(config, 2)
    assert [(p.epochs, p.boost_epochs, p.anneal_epochs) for p in config.phases] == [
        tuple(2 * n for n in phase) for phase in before
    ]
    for factor in (0, 1.5):
        with pytest.raises(ValueError, match="epochs factor must be an integer >= 1"):
            config_lib.scale_epochs(config, factor)


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="Unknown config variant 'huge'"):
        load(CONFIG_FILES[0], "huge")


@pytest.mark.parametrize(
    "name, arg, message",
    [
        ("deprune", "hard,huge", r"Unknown config variant 'huge' in 'hard,huge'.*'grow'"),
        (
            "sl",
            "grow",
            r"Unknown config variant 'grow'.*\('paper', 'hard', 'small', 'local', 'ushaped', 'smoke'\)",
        ),
        ("casl", "steps,smoke", r"Unknown config variant 'steps'"),
        ("deprune", "finetune", r"Unknown config variant 'finetune'.*'grow', 'lean', 'paper'"),
        ("prune", "grow", r"Unknown config variant 'grow'.*'finetune', 'steps', 'paper'"),
        ("deprune", "hard,", r"Empty config variant in 'hard,'"),
        ("prune", ",smoke", r"Empty config variant in ',smoke'"),
        ("casl", "hard,,smoke", r"Empty config variant in 'hard,,smoke'"),
        ("prune", "steps,smoke,steps", r"Config variant 'steps' is repeated"),
        ("sl", "smoke,smoke", r"Config variant 'smoke' is repeated"),
        ("deprune", "hard,paper", r"\['hard', 'paper'\] in 'hard,paper' set the same keys"),
    ],
)
def test_bad_variant_lists_are_rejected(name, arg, message):
    with pytest.raises(ValueError, match=message):
        load(os.path.join(CONFIG_DIR, f"{name}.py"), arg)


def test_parse_variants():
    assert config_lib.parse_variants(None) == frozenset()
    assert config_lib.parse_variants("") == frozenset()
    assert config_lib.parse_variants("smoke, hard") == {"smoke", "hard"}
    assert config_lib.parse_variants("grow,smoke", ("grow",)) == {"grow", "smoke"}
    with pytest.raises(ValueError, match="must be a string.*Received: 3"):
        config_lib.parse_variants(3)
