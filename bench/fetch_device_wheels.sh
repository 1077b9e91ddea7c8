#!/usr/bin/env bash
# Download, here, the wheels bench/device_check.sh installs on the GPU machine where its python lacks them:
# CPython 3.12, manylinux x86_64, the versions this project is tested with, and their dependencies (~45 MB).
#
#     bench/fetch_device_wheels.sh            (PYTHON=/path/to/python to choose the pip; default python3)
#
# They go to .whl/ at the repository root, which this script adds to .git/info/exclude (a local ignore: the
# wheels are never committed). Name `.whl` in the device run's `carry`; the whole tree travels under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf .whl && mkdir .whl  # one version of each package: two would stop the install there
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 huggingface-hub==2.4.0 pytest==9.2.0
echo "$(ls .whl/*.whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
