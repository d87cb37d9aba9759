#!/usr/bin/env bash
# Prepare TensorFlow for this workplace's device machine, whose image has no TensorFlow.
#
# The machine (see the `device` tool) has Python 3.12 with numpy, scipy, scikit-learn, pandas and
# matplotlib, no network, and takes at most 64 MiB of working tree per call. TensorFlow's CUDA
# build needs CUDA 12 libraries (several GB) that cannot travel, so this carries the CPU build to
# use the machine's 16 cores: tensorflow-cpu for cp312 without its C headers, xz-compressed
# (~129 MiB), split in three pieces (.tfc1, .tfc2, .tfc3) that three consecutive calls carry. The
# machine keeps /tmp while it stays warm (30 s after a call), so the calls must follow at once.
#
#   bash benchmarks/device_tf_bundle.sh            # here, once: fills .tfc1 .tfc2 .tfc3 (~6 min)
#   run carry=[.tfc1]: cp .tfc1/p /tmp/tf.p1
#   run carry=[.tfc2]: cp .tfc2/p /tmp/tf.p2
#   run carry=[.tfc3]: bash .tfc3/setup.sh && export PYTHONPATH=/tmp/site:$PWD && python3 benchmarks/...
#
# The three folders must be ignored by git (.git/info/exclude), or they travel in every call.
set -euo pipefail
TF_VERSION=${TF_VERSION:-2.21.0}
root=$(git rev-parse --show-toplevel)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$1" "${@:2}"; }
cd "$root"
for d in .tfc1 .tfc2 .tfc3; do
    grep -qx "/$d/" "$(git rev-parse --git-path info/exclude)" 2>/dev/null \
        || echo "/$d/" >>"$(git rev-parse --git-path info/exclude)"
    rm -rf "$d" && mkdir -p "$d"
done
get "$work" "tensorflow-cpu==$TF_VERSION"
(cd "$work" && unzip -q tensorflow_cpu-*.whl && tar --exclude=tensorflow/include -cf - tensorflow \
    | xz -T2 -9e >tf.tar.xz)
split -b 47M -d "$work/tf.tar.xz" "$work/part."
mv "$work/part.00" .tfc1/p && mv "$work/part.01" .tfc2/p && mv "$work/part.02" .tfc3/p
# TensorFlow's and this project's pure-Python needs that the image lacks, at this venv's versions
get .tfc3 keras==3.15.1 optree==0.20.0 namex==0.1.0 mrcfile==1.5.4 starfile==0.5.13 \
    argparse-dataclass==2.0.0 astunparse==1.6.3 gast==0.7.0 google-pasta==0.2.0 termcolor==3.3.0 \
    flatbuffers==25.12.19 protobuf==7.36.2 h5py==3.14.0 ml_dtypes==0.6.0
cat >.tfc3/setup.sh <<'SETUP'
set -e
mkdir -p /tmp/site
cat /tmp/tf.p1 /tmp/tf.p2 .tfc3/p | xz -d -T0 | tar -x -C /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .tfc3/*.whl
SETUP
du -sh .tfc1 .tfc2 .tfc3
