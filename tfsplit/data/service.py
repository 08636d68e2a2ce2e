"""A tf.data service (a dispatcher and workers) for `data.service_address`.

When one machine's CPUs cannot keep up with reading and decoding shards, the workers do it:
training sends its pipeline to the dispatcher, and each worker reads the shard files it is
given (one split per shard file; every shard once per epoch). Workers read the shard paths
themselves, so they need the same local or shared filesystem as the index.

TensorFlow's dispatcher and workers listen on every interface of their port (TensorFlow offers
no bind address); the addresses they give out are the `host` given here.
"""

import dataclasses

import tensorflow as tf
from absl import logging

from tfsplit.data import common

_SERVICE = tf.data.experimental.service


@dataclasses.dataclass
class DataService:
    """Running servers of this process: the dispatcher (when started here) and the workers."""

    address: str  # "grpc://host:port" of the dispatcher: the value of data.service_address.
    dispatcher: object
    workers: list

    def join(self):
        """Blocks while the servers run (a tool's main loop)."""
        (self.dispatcher or self.workers[0]).join()


def start_data_service(num_workers=2, port=0, host="127.0.0.1", dispatcher=None):
    """Starts a dispatcher on `port` (unless `dispatcher` names one) and `num_workers` workers.

    Args:
      num_workers: workers to start in this process (>= 0; 0 only with a dispatcher here).
      port: the dispatcher's port; 0 picks a free one.
      host: the address workers and clients are given for the servers started here.
      dispatcher: "host:port" of a running dispatcher to join instead of starting one.

    Returns:
      A `DataService`; its servers stop when the process ends.
    """
    if not common.is_int(num_workers) or num_workers < 0:
        raise ValueError(f"`num_workers` must be an int >= 0. Received: {num_workers!r}")
    if not common.is_int(port) or not 0 <= port <= 65535:
        raise ValueError(f"`port` must be an int in [0, 65535]. Received: port={port!r}")
    if not isinstance(host, str) or not host or ":" in host.strip("[]"):
        raise ValueError(f"`host` must be a host name or IPv4 address. Received: host={host!r}")
    server = None
    if dispatcher is None:
        if num_workers == 0 and port == 0:
            raise ValueError("A dispatcher on a picked port needs workers in this process.")
        server = _SERVICE.DispatchServer(_SERVICE.DispatcherConfig(port=port, protocol="grpc"))
        dispatcher = f"{host}:{server.target.rsplit(':', 1)[1]}"
        logging.info("tf.data service dispatcher at grpc://%s", dispatcher)
    elif not isinstance(dispatcher, str) or not dispatcher.rsplit(":", 1)[-1].isdigit():
        raise ValueError(f"`dispatcher` must be 'host:port'. Received: dispatcher={dispatcher!r}")
    dispatcher = dispatcher.removeprefix("grpc://")
    workers = [
        _SERVICE.WorkerServer(
            _SERVICE.WorkerConfig(
                dispatcher_address=dispatcher, worker_address=f"{host}:%port%", port=0
            )
        )
        for _ in range(num_workers)
    ]
    logging.info("%d tf.data service workers joined grpc://%s", num_workers, dispatcher)
    return DataService(f"grpc://{dispatcher}", server, workers)
