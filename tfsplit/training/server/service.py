"""The gRPC side of a split training server: the servicer of one run, and starting it."""

import concurrent.futures
import threading

import grpc
from absl import logging

from tfsplit.serving import validation
from tfsplit.serving.grpc_service import answer_or_abort
from tfsplit.training import split_training_pb2_grpc as pb_grpc
from tfsplit.training.messages import MAX_MESSAGE_BYTES
from tfsplit.training.server import state
from tfsplit.training.server.tail_trainer import MAX_DEVICES, TailTrainer

_MAX_SIDE, _MAX_CLASSES = 4096, 100000


class TrainingServicer(pb_grpc.SplitTrainingServicer):
    """The gRPC service of one run; its `TailTrainer` is built at the first Hello.

    Args:
      build_split: (image_shape, num_classes) -> the run's compiled `SplitModel` (the server
        learns the data's shapes from the device, which holds the data).
      state_dir: where the run's state is kept to restart.
      **trainer_options: the `TailTrainer`'s (parallel mode and its timeouts).
    """

    def __init__(self, build_split, state_dir=None, **trainer_options):
        self._build_split = build_split
        self._state_dir = state_dir
        self._options = trainer_options
        self._lock = threading.Lock()
        self.trainer = None
        shapes = None if state_dir is None else state.read_shapes(state_dir)
        if shapes is not None:  # A restarted server: back to where the run was.
            self.trainer = TailTrainer(build_split(*shapes), state_dir, **trainer_options)
            self.trainer.restore()

    def _hello(self, request):
        with self._lock:
            if self.trainer is None:
                shape, classes = list(request.image_shape), request.num_classes
                if len(shape) != 3 or not all(0 < d <= _MAX_SIDE for d in shape):
                    raise validation.invalid(
                        f"image_shape must be [H, W, C] in 1..{_MAX_SIDE}. Received: {shape}"
                    )
                if not 0 < classes <= _MAX_CLASSES:
                    raise validation.invalid(
                        f"num_classes must be in 1..{_MAX_CLASSES}. Received: {classes}"
                    )
                self.trainer = TailTrainer(
                    self._build_split(tuple(shape), classes), self._state_dir, **self._options
                )
                if self._state_dir is not None:
                    state.write_shapes(self._state_dir, shape, classes)
        return self.trainer.hello(request)

    def _opened(self):
        if self.trainer is None:
            raise validation.RequestError(
                grpc.StatusCode.FAILED_PRECONDITION, "No run is open; call Hello first."
            )
        return self.trainer

    def Hello(self, request, context):  # noqa: N802  (the gRPC method name)
        return answer_or_abort(context, "Hello", lambda: self._hello(request))

    def Step(self, request, context):  # noqa: N802
        return answer_or_abort(context, "Step", lambda: self._opened().step(request))

    def TailWeights(self, request, context):  # noqa: N802
        return answer_or_abort(context, "TailWeights", lambda: self._opened().tail_weights(request))

    def Checkpoint(self, request, context):  # noqa: N802
        return answer_or_abort(context, "Checkpoint", lambda: self._opened().checkpoint(request))

    def AverageHeads(self, request, context):  # noqa: N802
        return answer_or_abort(
            context, "AverageHeads", lambda: self._opened().average_heads(request)
        )


def serve(servicer, port=0, host="127.0.0.1", credentials=None, interceptors=()):
    """Starts `servicer` (a `TrainingServicer`) on host:port (0 picks one); returns
    (server, port).

    Args:
      credentials: grpc.ServerCredentials for TLS, or None for plain TCP.
      interceptors: server interceptors (the token check).
    """
    server = grpc.server(
        # A thread per device at least: in parallel mode a step waits there for the others'.
        concurrent.futures.ThreadPoolExecutor(max_workers=MAX_DEVICES + 4),
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    pb_grpc.add_SplitTrainingServicer_to_server(servicer, server)
    address = f"{host}:{port}"
    bound = (
        server.add_secure_port(address, credentials)
        if credentials
        else server.add_insecure_port(address)
    )
    if not bound:
        raise OSError(f"Could not listen on {address}")
    server.start()
    logging.info("Split training server listening on %s:%d", host, bound)
    return server, bound
