# signedrec: the main job (train the embedded default model if absent, then serve it).
# Build: docker build -t signedrec .
# Run:   docker run -p 8000:8000 -v signedrec-state:/data signedrec
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 signedrec
WORKDIR /app

# Only what the package and the default model need (no local .venv, state or caches).
COPY --chown=signedrec:signedrec pyproject.toml README.md ./
COPY --chown=signedrec:signedrec server ./server
COPY --chown=signedrec:signedrec kernels ./kernels
COPY --chown=signedrec:signedrec benchmarks ./benchmarks
COPY --chown=signedrec:signedrec loadtest ./loadtest
COPY --chown=signedrec:signedrec model_artifacts ./model_artifacts
# The CPU build of torch from PyTorch's CPU index: PyPI's default wheel is the multi-GB CUDA one.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install -e .

# The event log and snapshots live in /data: mount a volume there, or every accepted event is
# gone with the container (docker run -v signedrec-state:/data ...).
RUN mkdir /data && chown signedrec:signedrec /data
ENV SIGNEDREC_SERVER__STATE_DIR=/data
VOLUME /data

# Runs unprivileged; build-default writes under /app/model_artifacts (a no-op: the default ships).
USER signedrec
EXPOSE 8000
# exec: the server replaces the shell as PID 1, so `docker stop` (SIGTERM) reaches it and it
# stops gracefully with a snapshot; under sh it waited out the timeout and was SIGKILLed.
CMD ["sh", "-c", "signedrec build-default && exec signedrec serve --host 0.0.0.0"]
