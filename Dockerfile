# One image for migrate, web and workers: `trainyard <command>` picks the role.
#
#   docker build -t trainyard .                                   # CPU-only torch (default)
#   docker build -t trainyard:gpu --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
#   docker build -t trainyard:gpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
FROM python:3.11-slim

# The CPU wheel index keeps the image free of the multi-GB CUDA libraries; point it at
# PyPI (whose Linux torch wheels bundle CUDA) or a CUDA index for GPU workers.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch first, in its own layer: it is by far the largest download and changes least.
# `pip install .[worker]` below then finds its torch requirement already satisfied.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.3"

COPY pyproject.toml README.md ./
COPY shared ./shared
COPY server ./server
COPY worker ./worker
COPY migrations ./migrations
RUN pip install ".[worker]"

# Not root: a job runs user-supplied specs; keep its blast radius small.
RUN useradd --create-home --uid 1000 trainyard \
    && mkdir -p /data/artifacts /data/datasets \
    && chown -R trainyard:trainyard /data
USER trainyard

ENV TRAINYARD_HOME=/data \
    TRAINYARD_ARTIFACTS_DIR=/data/artifacts \
    TRAINYARD_DATA_DIR=/data/datasets
VOLUME ["/data/artifacts"]
EXPOSE 8000

CMD ["trainyard", "web", "--host", "0.0.0.0", "--port", "8000"]
