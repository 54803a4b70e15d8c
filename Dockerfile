# One image for every Turnout service: `docker build -t turnout .`, then
# `docker run turnout frontend|router|worker|planner|up [flags]` (see docker-compose.yml, k8s/).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/turnout
# Dependencies first, so a source change does not reinstall them.
COPY pyproject.toml ./
RUN mkdir common services turnout \
    && pip install --no-compile ".[kubernetes]" \
    && pip uninstall -y turnout
COPY common ./common
COPY services ./services
COPY turnout ./turnout
RUN pip install --no-deps --no-compile . \
    && useradd --uid 10001 --create-home turnout \
    && mkdir -p /var/lib/turnout/discovery \
    && chown -R turnout /var/lib/turnout

USER 10001
# Bind all interfaces; peers are told this container's own address (compose: its IP on the
# project network; Kubernetes sets TURNOUT_ADVERTISE_HOST to the pod IP instead).
ENV TURNOUT_HOST=0.0.0.0 \
    TURNOUT_DISCOVERY=file:/var/lib/turnout/discovery
EXPOSE 8000 7000 7100 7101 9100
ENTRYPOINT ["/bin/sh", "-c", "export TURNOUT_ADVERTISE_HOST=\"${TURNOUT_ADVERTISE_HOST:-$(hostname -i | cut -d ' ' -f 1)}\"; exec turnout \"$@\"", "turnout"]
CMD ["up", "--port", "8000"]
