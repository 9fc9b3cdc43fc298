#!/usr/bin/env bash
# Wheels of gannet's packages that a lent GPU host lacks, for scripts/gpu_check.sh on a
# host that cannot reach PyPI. The H200 lent on 2026-12-04 had Python 3.12 with torch,
# torchvision, numpy, OpenCV and pytest; the rest of what the CUDA tests and
# `gannet bench --in-process` import, and py-spy for the profiles, is listed below (a
# missing one cost a whole call once: opentelemetry-proto). Versions are this checkout's
# .venv's, so the GPU runs what the tests here ran; `--no-deps`, since the list is the
# closure. Usage: scripts/gpu_wheels.sh [DIR [PYTHON_VERSION]] (defaults .whl and 3.12),
# after `make install`; then carry DIR to the host and run
# `GPU_CHECK_WHEELS=DIR scripts/gpu_check.sh OUT` there.
set -euo pipefail
dir=${1:-.whl}
python_version=${2:-3.12}
packages=(
    annotated-types cffi cryptography google-api-core google-auth google-cloud-core
    google-cloud-monitoring google-cloud-pubsub google-cloud-storage google-crc32c
    google-resumable-media googleapis-common-protos grpc-google-iam-v1 grpcio grpcio-status
    opentelemetry-api opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions
    proto-plus protobuf psycopg psycopg-binary psycopg-pool py-spy pycparser pydantic
    pydantic-core pydantic-settings python-dotenv simplejpeg typing-extensions
    typing-inspection ultralytics
)
[ -x .venv/bin/python ] || { echo "no .venv here: run make install first" >&2; exit 1; }
pins=$(.venv/bin/python - "${packages[@]}" <<'PY'
import importlib.metadata
import sys

print(" ".join(f"{name}=={importlib.metadata.version(name)}" for name in sys.argv[1:]))
PY
)
mkdir -p "$dir"
# shellcheck disable=SC2086 # one word per pin
python3 -m pip download -q --no-deps --only-binary=:all: --dest "$dir" \
    --python-version "$python_version" --implementation cp \
    --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 $pins
echo "$(ls "$dir"/*.whl | wc -l) wheels in $dir ($(du -sh "$dir" | cut -f1)) for Python $python_version"
