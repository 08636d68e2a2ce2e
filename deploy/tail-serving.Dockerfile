# TF Serving with a tail that tfsplit-export wrote (its serving/<model>/<version>/ SavedModel),
# built from this repository's root with the export's serving folder as a build argument:
#
#   tfsplit-export --workdir=/tmp/tfsplit/deprune
#   docker build -f deploy/tail-serving.Dockerfile \
#       --build-arg SERVING_DIR=export/serving/tfsplit_tail_int8 \
#       --build-arg MODEL_NAME=tfsplit_tail_int8 -t tfsplit-tail .
#   docker run -p 8500:8500 -p 8501:8501 tfsplit-tail
#
# SERVING_DIR is relative to the build context: copy (or link) the run's export/ into it first.
# The image's own entrypoint serves /models/${MODEL_NAME}: gRPC on 8500, REST on 8501.
FROM tensorflow/serving:2.18.0

ARG SERVING_DIR
ARG MODEL_NAME=tfsplit_tail_int8
ENV MODEL_NAME=${MODEL_NAME}
COPY ${SERVING_DIR} /models/${MODEL_NAME}
EXPOSE 8500 8501
