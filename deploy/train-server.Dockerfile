# The split training server, built from this repository (the build context is its root):
#
#   docker build -f deploy/train-server.Dockerfile -t tfsplit-train-server .
#   docker run -p 50051:50051 -v /srv/tfsplit:/var/lib/tfsplit \
#       -v /srv/tfsplit-secrets:/etc/tfsplit:ro tfsplit-train-server
#
# The arguments after the image replace CMD (the config, the token file, TLS). The run's state
# (checkpoint and step log) lives in /var/lib/tfsplit: keep it on a volume, and a restarted
# container carries on where the run was.
FROM python:3.11-slim

WORKDIR /opt/tfsplit
COPY pyproject.toml setup.cfg README.md ./
COPY tfsplit ./tfsplit
COPY tools ./tools
COPY configs ./configs
RUN python -m pip install --no-cache-dir . \
    && useradd --system --uid 10001 tfsplit \
    && mkdir -p /var/lib/tfsplit && chown tfsplit /var/lib/tfsplit

USER tfsplit
EXPOSE 50051
VOLUME /var/lib/tfsplit
ENTRYPOINT ["tfsplit-train-server"]
CMD ["--config=/opt/tfsplit/configs/deprune.py", "--workdir=/var/lib/tfsplit", \
     "--host=0.0.0.0", "--port=50051", "--tokens_file=/etc/tfsplit/tokens", \
     "--tls_cert=/etc/tfsplit/tls/tls.crt", "--tls_key=/etc/tfsplit/tls/tls.key"]
