"""Runs a tf.data service that reads and decodes shards for training (data.service_address).

  tfsplit-data-service --port=5050 --workers=2          # a dispatcher and 2 workers
  tfsplit-data-service --dispatcher=HOST:5050 --workers=4  # more workers, on another machine
  tfsplit-train --config=configs/deprune.py --config.data.name=shards \
      --config.data.path=/shared/shards --config.data.service_address=grpc://HOST:5050 ...

Prints the dispatcher's address, then serves until stopped (Ctrl-C or SIGTERM). Workers read the
shard files themselves: they need the index's filesystem (local or shared).
"""

import sys

from absl import app, flags

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfsplit.data.service import start_data_service
from tfsplit_tools import cli

_PORT = flags.DEFINE_integer("port", 0, "Dispatcher port; 0 picks a free one.", lower_bound=0)
_WORKERS = flags.DEFINE_integer("workers", 2, "Workers to run in this process.", lower_bound=0)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address given to workers and clients.")
_DISPATCHER = flags.DEFINE_string(
    "dispatcher", None, "host:port of a running dispatcher to add workers to (none is started)."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    service = start_data_service(_WORKERS.value, _PORT.value, _HOST.value, _DISPATCHER.value)
    print(f"data.service_address={service.address} ({len(service.workers)} workers here)")
    sys.stdout.flush()
    service.join()


if __name__ == "__main__":  # python -m: the quieting reaches only what is still to load (cli)
    cli.quiet_tensorflow_startup(sys.argv)
    cli.run(main)
