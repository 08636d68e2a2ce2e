"""The trainable head of every shipped backbone at every named cut, converted and its op list
checked: the record that each one holds TFLite builtins only.

  python -m benchmarks.trainable_ops --out=results/trainable_ops/all_cuts.json

Each cut layer is converted once (a short name and a stage name that point at the same layer
share it), at 32x32 input and width 1/8: the ops do not depend on widths or sizes. A cut whose
conversion fails is recorded with the failure's first line, and the run exits 1. CI converts the
stems and three deeper cuts (tests/test_trainable_head.py) and checks this file against the
backbones' current cut lists; converting all of them takes longer than the test suite may.
"""

import argparse
import hashlib
import json
import os
import sys
import time
import types

import tf_keras as keras

from tfsplit import backbones
from tfsplit.export import trainable, trainable_export
from tfsplit.training import trainer
from tfsplit.training.config import base_config, phase

# The code that decides a trainable head's ops: the record belongs to one version of it.
EXPORTER_SOURCES = ("builtin_grads.py", "trainable.py", "trainable_export.py")


def exporter_fingerprint():
    """sha256 over the exporter's source files (`EXPORTER_SOURCES` of tfsplit/export)."""
    digest = hashlib.sha256()
    for name in EXPORTER_SOURCES:
        with open(os.path.join(os.path.dirname(trainable.__file__), name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def _split(backbone, cut):
    config = base_config("deprune")
    config.model.backbone = backbone
    config.model.cut = cut
    config.model.width_multiplier = 0.125
    config.budget_loss.polarization = 0.5
    config.phases = [phase(budget=2, epochs=1, learning_rate=0.05)]
    keras.utils.set_random_seed(0)
    info = types.SimpleNamespace(image_shape=(32, 32, 3), num_classes=10)
    return trainer.build_split_model(config, info)


def cut_layers(backbone):
    """{cut layer: [the cut names that point at it]} of `backbone`, in network order."""
    layers = {}
    for name, layer in backbones.cut_points(backbone).items():
        layers.setdefault(layer, []).append(name)
    return layers


def check_cut(backbone, cut):
    """The record of one cut's conversion: ops, size and seconds, or the error."""
    started = time.monotonic()
    try:
        split = _split(backbone, cut)
        module = trainable.TrainableHead(split, *trainable_export.optimizer_settings(split))
        model = trainable_export.convert(module)
    except Exception as error:  # recorded, and the run fails at its end
        return dict(error=f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
    names = trainable_export.op_names(model)
    return dict(
        ops=names,
        builtins_only=not [n for n in names if n.startswith("Flex") or n == "CUSTOM"],
        bytes=len(model),
        convert_seconds=round(time.monotonic() - started, 1),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--backbones", default=",".join(backbones.BACKBONES))
    args = parser.parse_args()
    report = dict(
        command=" ".join(["python -m benchmarks.trainable_ops", *sys.argv[1:]]),
        exporter_sha256=exporter_fingerprint(),
    )
    cuts = report["cuts"] = {}
    for backbone in args.backbones.split(","):
        for layer, names in cut_layers(backbone).items():
            record = dict(backbone=backbone, cut_names=names, **check_cut(backbone, names[0]))
            cuts[f"{backbone}/{layer}"] = record
            print(f"{backbone}/{layer}", json.dumps(record), flush=True)
    failed = [key for key, record in cuts.items() if not record.get("builtins_only")]
    report["failed"] = failed
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{len(cuts) - len(failed)} of {len(cuts)} cuts hold builtin ops only; failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
