# disca_tools: the whole tool chain (disca_simulate, disca_pick, disca_extract, disca_cluster,
# disca_evaluate, disca_classify3d, disca_split_star, disca_reembed) on PATH, CPU TensorFlow.
#
#   docker build -t disca_tools .
#   docker run --rm -v "$PWD":/project -w /project disca_tools disca_pick --help
#
# Build with --build-arg WITH_RELION=1 to add Debian's RELION 3.1 (relion_reconstruct,
# relion_refine, relion_pipeliner) for the RELION round-trip tests and `make demo`.
FROM python:3.11-slim

ARG WITH_RELION=0
# --build-arg WITH_CUDA=1 installs TensorFlow's CUDA libraries for GPU nodes (run with --gpus all,
# or `apptainer exec --nv`).
ARG WITH_CUDA=0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MPLBACKEND=Agg

# procps: joblib's process pool (the parallel mixture fits, --j) stops its workers with pgrep; the
# slim base image lacks it, and without it a failing run's workers are not stopped
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends procps \
    && if [ "$WITH_RELION" = "1" ]; then \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends relion; \
    fi \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/disca_tools
COPY pyproject.toml README.md LICENSE constraints.txt ./
COPY disca_tools ./disca_tools
RUN pip install -c constraints.txt . \
    && if [ "$WITH_CUDA" = "1" ]; then pip install -c constraints.txt "tensorflow[and-cuda]"; fi \
    && for t in disca_simulate disca_pick disca_extract disca_cluster disca_evaluate disca_classify3d disca_split_star disca_reembed; \
       do "$t" --help > /dev/null || exit 1; done

# Run from the RELION project directory: every path inside STAR files is relative to it.
WORKDIR /project
CMD ["disca_pick", "--help"]
