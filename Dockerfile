# leadloop as a container: the daemon by default (`run`), any other command by argument.
#   docker build -t leadloop .
#   docker run --rm -v $PWD/leadloop.toml:/config/leadloop.toml:ro --env-file leadloop.env leadloop
# Secrets come from the environment (--env-file / compose env_file), never from the image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LEADLOOP_CONFIG=/config/leadloop.toml

RUN groupadd --system --gid 10001 leadloop \
 && useradd --system --uid 10001 --gid leadloop --home-dir /var/lib/leadloop --create-home leadloop

WORKDIR /opt/leadloop
COPY pyproject.toml README.md ./
COPY leadloop ./leadloop
RUN pip install . && rm -rf /opt/leadloop/build

# State (SQLite database, models, reports) lives in a volume; the config is mounted read-only.
WORKDIR /var/lib/leadloop
VOLUME ["/var/lib/leadloop"]
USER leadloop

# The daemon stops on SIGTERM after the batch in flight (give it stop_grace_period >= [schedule]
# stop_timeout_seconds). Exec form, so leadloop is PID 1 and receives the signal itself.
STOPSIGNAL SIGTERM
ENTRYPOINT ["leadloop", "--log-format", "json"]
CMD ["run", "--wait"]
