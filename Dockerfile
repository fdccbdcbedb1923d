# diffbank image for api, worker and beat. GPU workers: run with the NVIDIA container runtime.
FROM python:3.11.10-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api ./api
COPY cli ./cli
COPY worker ./worker
COPY registry ./registry
COPY serving ./serving
COPY diffs ./diffs
COPY datasets_io ./datasets_io
COPY settings ./settings
# A CUDA build of torch for GPU workers; pin it with the rest.
RUN pip install torch==2.5.1 && pip install .
RUN useradd --create-home diffbank && mkdir -p /var/lib/diffbank && chown diffbank /var/lib/diffbank
USER diffbank
EXPOSE 8000
CMD ["diffbank", "api"]
