"""The gRPC side of a split training server: the servicer of one run, and starting it."""

import concurrent.futures
import threading

import grpc
import tensorflow as tf
from absl import logging

from tfsplit.protocol import split_training_pb2 as pb
from tfsplit.protocol import split_training_pb2_grpc as pb_grpc
from tfsplit.serving import validation
from tfsplit.serving.grpc_service import add_servicer, answer_or_abort, parsed
from tfsplit.training.messages import MAX_MESSAGE_BYTES, model_digest, shown, weights_from_protos
from tfsplit.training.server import state
from tfsplit.training.server.checks import check_device_id, check_digest
from tfsplit.training.server.tail_trainer import (
    DEVICE_TIMEOUT_S,
    MAX_BATCH_SIZE,
    MAX_DEVICES,
    MAX_LEARNING_RATE,
    TailTrainer,
)

_MAX_SIDE, _MAX_CLASSES = 4096, 100000
SERVICE_NAME = "tfsplit.training.SplitTraining"
# The service's methods: (request, reply) message classes.
_METHODS = {
    "Hello": (pb.HelloRequest, pb.HelloReply),
    "Step": (pb.StepRequest, pb.StepReply),
    "TailWeights": (pb.TailWeightsRequest, pb.TailWeightsReply),
    "Checkpoint": (pb.CheckpointRequest, pb.CheckpointReply),
    "AverageHeads": (pb.AverageHeadsRequest, pb.AverageHeadsReply),
    "Leave": (pb.LeaveRequest, pb.LeaveReply),
}


def one_inter_op_thread():
    """Runs this process's TensorFlow ops with one inter-op thread; call it before the first op.

    A server's steps run one at a time (under its run's lock), and a network's ops mostly in a
    chain, so more threads there buy no speed. But TensorFlow's oneDNN kernels keep a cache of
    compiled primitives in each thread, one per layer and batch size: every inter-op thread that
    ran a step at a new batch size held a copy of its own, and the server's memory kept growing
    with the batch sizes its devices (or an attacker) sent.
    """
    tf.config.threading.set_inter_op_parallelism_threads(1)


def config_limits(config):
    """The servicer's bounds that a run's config fixes: the largest batch it sends (training or
    evaluation) and the largest learning rate its phases set (None when a phase leaves the rate
    to a schedule: then the servicer's default bound holds)."""
    rates = [p.learning_rate for p in config.phases]
    if any(rate is None for rate in rates):
        max_rate = None
    else:
        max_rate = max(rates + [p.get("boost_learning_rate") or 0.0 for p in config.phases])
    return dict(
        max_batch_size=max(config.data.batch_size, config.data.eval_batch_size),
        max_learning_rate=max_rate if max_rate and max_rate > 0 else None,
    )


class TrainingServicer(pb_grpc.SplitTrainingServicer):
    """The gRPC service of one run; its `TailTrainer` is built at the first Hello whose model
    digest matches the model this server builds for the Hello's shapes (a Hello that does not
    match adopts nothing: no trainer, no `shapes.json`).

    Args:
      build_split: (image_shape, num_classes) -> the run's compiled `SplitModel` (the server
        learns the data's shapes from the device, which holds the data).
      state_dir: where the run's state is kept to restart.
      identify: context -> the device id the call authenticated (a per-device token or client
        certificate), or None where the server has no per-device identity. A request then acts
        as that device: an empty device_id becomes it, another one is refused with
        PERMISSION_DENIED.
      max_batch_size: the most samples one step may carry (default `MAX_BATCH_SIZE`; the
        config's are in `config_limits`).
      max_devices: how many devices may be in the run at once (default `MAX_DEVICES`).
      max_learning_rate: the largest learning rate a step may ask for (default
        `MAX_LEARNING_RATE`; the config's is in `config_limits`).
      device_timeout_s: how long a device may stay silent before a new device may take its slot
        in a full run (default `DEVICE_TIMEOUT_S`).
      shapes: (image_shape, num_classes) when the server's config fixes them: a Hello with other
        shapes is refused, and no model is built for it.
      **trainer_options: the `TailTrainer`'s others (parallel mode and its timeouts, the step
        log's bound).
    """

    def __init__(
        self,
        build_split,
        state_dir=None,
        *,
        identify=None,
        max_batch_size=None,
        max_devices=None,
        max_learning_rate=None,
        device_timeout_s=None,
        shapes=None,
        **trainer_options,
    ):
        self._build_split = build_split
        self._state_dir = state_dir
        self._identify = identify
        given = dict(
            max_batch_size=(max_batch_size, MAX_BATCH_SIZE),
            max_devices=(max_devices, MAX_DEVICES),
            max_learning_rate=(max_learning_rate, MAX_LEARNING_RATE),
            device_timeout_s=(device_timeout_s, DEVICE_TIMEOUT_S),
        )
        limits = {k: default if v is None else v for k, (v, default) in given.items()}
        self._options = dict(trainer_options, **limits)
        self.max_devices = limits["max_devices"]
        self._shapes = None if shapes is None else (tuple(shapes[0]), int(shapes[1]))
        self._lock = threading.Lock()
        self._candidate = None  # (shapes, split, digest) of the last Hello's shapes
        self.trainer = None
        saved = None if state_dir is None else state.read_shapes(state_dir)
        if saved is not None:  # A restarted server: back to where the run was.
            if self._shapes is not None and saved != self._shapes:
                raise ValueError(
                    f"The state in {state_dir} is a run of shapes {saved}; this server's config "
                    f"fixes {self._shapes}. Give the run's config, or another state directory."
                )
            self.trainer = TailTrainer(build_split(*saved), state_dir, **self._options)
            self.trainer.restore()

    # ------------------------------------------------------------------------------- the run
    def _checked_shapes(self, request):
        """The Hello's (image_shape, num_classes), checked before any model is built."""
        shape, classes = request.image_shape, request.num_classes
        if self._shapes is not None:
            if len(shape) != len(self._shapes[0]) or (tuple(shape), classes) != self._shapes:
                raise validation.invalid(
                    f"This server's run has image_shape {list(self._shapes[0])} and "
                    f"num_classes {self._shapes[1]}. Received: {shown(shape)}, {classes}"
                )
            return self._shapes
        if len(shape) != 3 or not all(0 < d <= _MAX_SIDE for d in shape):
            raise validation.invalid(
                f"image_shape must be [H, W, C] in 1..{_MAX_SIDE}. Received: {shown(shape)}"
            )
        if not 0 < classes <= _MAX_CLASSES:
            raise validation.invalid(
                f"num_classes must be in 1..{_MAX_CLASSES}. Received: {classes}"
            )
        return tuple(shape), classes

    def _model_for(self, shapes):
        """The model this server builds for `shapes`, and its digest (the last one is kept, so
        that the Hellos of one device build it once)."""
        if self._candidate is None or self._candidate[0] != shapes:
            self._candidate = None  # the old one goes before the new one is built
            split = self._build_split(*shapes)
            self._candidate = (shapes, split, model_digest(split))
        return self._candidate[1:]

    def _hello(self, request):
        with self._lock:
            if self.trainer is None:
                check_device_id(request.device_id)
                shapes = self._checked_shapes(request)
                split, digest = self._model_for(shapes)
                check_digest(request.model_digest, digest)  # before anything is adopted
                if request.tail_weights:
                    weights_from_protos(request.tail_weights, split.tail.get_weights())
                trainer = TailTrainer(split, self._state_dir, **self._options)
                reply = trainer.hello(request)
                if self._state_dir is not None:
                    state.write_shapes(self._state_dir, *shapes)
                self.trainer, self._candidate = trainer, None
                return reply
        return self.trainer.hello(request)

    def _opened(self):
        if self.trainer is None:
            raise validation.RequestError(
                grpc.StatusCode.FAILED_PRECONDITION, "No run is open; call Hello first."
            )
        return self.trainer

    def _as_caller(self, context, request):
        """`request`, parsed, acting as the device the call authenticated (if any)."""
        request = parsed(request)
        if self._identify is None:
            return request
        try:
            device_id = self._identify(context)
        except PermissionError as error:
            raise validation.RequestError(grpc.StatusCode.PERMISSION_DENIED, str(error)) from None
        if device_id is None or not hasattr(request, "device_id"):
            return request  # TailWeights names no device: the shared tail, to any device
        if not request.device_id:
            request.device_id = device_id
        elif request.device_id != device_id:
            raise validation.RequestError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"Device {shown(device_id)} may act only as itself. Received: device_id="
                f"{shown(request.device_id)}",
            )
        return request

    # ------------------------------------------------------------------------------- methods
    def _answer(self, context, method, request, handle):
        """handle(request) as the caller, or the refusal's status (parsed and identified
        first: before the run's state is looked at)."""
        return answer_or_abort(context, method, lambda: handle(self._as_caller(context, request)))

    def Hello(self, request, context):  # noqa: N802  (the gRPC method name)
        return self._answer(context, "Hello", request, self._hello)

    def Step(self, request, context):  # noqa: N802
        return self._answer(context, "Step", request, lambda r: self._opened().step(r))

    def TailWeights(self, request, context):  # noqa: N802
        return self._answer(
            context, "TailWeights", request, lambda r: self._opened().tail_weights(r)
        )

    def Checkpoint(self, request, context):  # noqa: N802
        return self._answer(context, "Checkpoint", request, lambda r: self._opened().checkpoint(r))

    def AverageHeads(self, request, context):  # noqa: N802
        return self._answer(
            context, "AverageHeads", request, lambda r: self._opened().average_heads(r)
        )

    def Leave(self, request, context):  # noqa: N802
        return self._answer(context, "Leave", request, lambda r: self._opened().leave_request(r))


def add_to_server(servicer, server):
    """Registers `servicer` on `server` (undecodable bytes: one INVALID_ARGUMENT line)."""
    add_servicer(servicer, server, SERVICE_NAME, _METHODS)


def serve(servicer, port=0, host="127.0.0.1", credentials=None, interceptors=()):
    """Starts `servicer` (a `TrainingServicer`) on host:port (0 picks one); returns
    (server, port).

    Args:
      credentials: grpc.ServerCredentials for TLS, or None for plain TCP.
      interceptors: server interceptors (the token check).
    """
    server = grpc.server(
        # A thread per device at least: in parallel mode a step waits there for the others'.
        concurrent.futures.ThreadPoolExecutor(
            max_workers=getattr(servicer, "max_devices", MAX_DEVICES) + 4
        ),
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    add_to_server(servicer, server)
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
