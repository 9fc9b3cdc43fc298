#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one go, for a GPU host lent for a few minutes:
#   1. the GPU's and the libraries' versions;
#   2. the tests that run on CUDA (nvJPEG decode, device letterbox, answers against the
#      host's, CUDA graphs), the rest of tests/test_device_decode.py beside them;
#   3. `gannet bench --in-process` on cuda:0: the daemon's model path (nvJPEG, device
#      letterbox, FP16 batched forward, NMS, result JSON), with CUDA graphs and without,
#      with 4, 8 and 16 runners against the bare model per call and batched on 640x480
#      photos, 8 on 4032x3024; 4 and 8 runners on 4 cores, as a pod;
#   4. the same on 3.5 MB phone photos, decoded as GANNET_GPU_DECODE's default (auto)
#      chooses, all by nvJPEG, and all on the CPU, and on the bench's mix of photo
#      shapes, with 8 and 16 runners: the batches a mix reaches;
#   5. the shipped pipelines (agro's FULL_PIPELINE and FIELD_ANALYSIS, vending's
#      SHELF_AUDIT) with 4 and 8 runners: how much of the time their models run;
#   6. py-spy profiles (CPU, then GIL holders) of the daemon's path at 640x480 with 16
#      runners, where on an H200 the runners' GIL-held work binds.
# (The agreement runs that found scene_02's missing detection to be nvJPEG's pixels,
# docs/benchmark.md "On a GPU again", are the bench with GANNET_GPU_DECODE=0, then with
# GANNET_TORCHSCRIPT=0.) On an H200, before the benches ran graphs and none side by
# side, the steps took about 10, 30, 55, 50 and 50 s; both variants about double the
# benches and the profiles, and the bare model's second pass per round adds about a tenth
# (the third lease ran them in 12, 36, 88, 63, 85 and 2 x 45 s before that pass): about 8
# minutes before the pipeline steps were added. With them the script outgrows one
# 10-minute command on such a host: run it in two, e.g. GPU_CHECK_STEPS="versions
# pytest bench pipeline-agro pipeline-sliced pipeline-vending", then the rest. On an
# H100 (2026-12-05) versions and pytest took 8 and 25 s, the 640x480 bench with 2 runner
# counts and 2 rounds 51 s, the same on 4 cores 52 s, bench-phone and
# bench-phone-cpu-decode 25 and 32 s: those five steps fit one call with room to spare.
# Usage: scripts/gpu_check.sh OUT_DIR [DEVICE [IMAGES]], from the repo root, with gannet's
# dependencies importable (PYTHONPATH or a venv) and py-spy on PATH; or, on a host without
# PyPI, GPU_CHECK_WHEELS=DIR with the wheels scripts/gpu_wheels.sh fetched into DIR: they
# are installed first, outside the host's own packages. DEVICE defaults to cuda:0 (cpu
# tries the script out), IMAGES per measurement to 1000. Every step's output goes to
# OUT_DIR/steps.log, beside the benches' JSON and the profiles; a failed step does not
# stop the next one, and the script exits non-zero if any failed.
# GPU_CHECK_STEPS="versions pytest bench ..." runs only the steps it names (in the
# script's order), for a lease too short for all of them.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR [DEVICE [IMAGES]]}
device=${2:-cuda:0}
images=${3:-1000}
case $device in
    cpu | cuda | cuda:[0-9]*) ;;
    *)  # a lease once lost two steps to `gpu_check.sh OUT 1000`: 1000 taken as the device
        echo "DEVICE is cpu, cuda or cuda:N, not '$device'" \
            "(usage: scripts/gpu_check.sh OUT_DIR [DEVICE [IMAGES]])" >&2
        exit 2 ;;
esac
mkdir -p "$out"
if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        "$GPU_CHECK_WHEELS"/*.whl || { echo "cannot install $GPU_CHECK_WHEELS/*.whl" >&2; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" YOLO_OFFLINE=1 PYTHONUNBUFFERED=1
failed=0
step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log to OUT_DIR/steps.log
    local name=$1 limit=$2
    shift 2
    if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ " $GPU_CHECK_STEPS " != *" $name "* ]]; then
        return 0
    fi
    echo "== $name ($(date +%T))" | tee -a "$out/steps.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/steps.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "== $name FAILED (exit $rc)" | tee -a "$out/steps.log"; failed=1; }
}
step versions 60 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
  nproc; python3 -c "import sys, torch, torchvision, ultralytics;
print(sys.version.split()[0], torch.__version__, torchvision.__version__, ultralytics.__version__,
torch.cuda.is_available())"'
# -W default: the suite turns warnings into errors against its pinned versions; a GPU
# host's other torch shows warnings instead of failing on them.
step pytest 120 python3 -m pytest -q -p no:cacheprovider -W default -rs tests/test_device_decode.py \
    tests/test_cuda_graphs.py
step bench 240 python3 -m gannet bench --in-process --device "$device" --images "$images" \
    --rounds 3 --sizes 640x480 --runners-sweep 4,8,16 --output "$out/bench.json"
# The same on 4 cores (taskset), the bare model pinned too: a production pod's 4 vCPUs.
# On an H100 they carried the model path as far as 16 did (docs/benchmark.md, "On an H100").
step bench-4-cores 200 taskset -c 0-3 python3 -m gannet bench --in-process --device "$device" \
    --images "$images" --rounds 2 --sizes 640x480 --runners-sweep 4,8 --output "$out/bench-4-cores.json"
step bench-large 150 python3 -m gannet bench --in-process --device "$device" --images "$images" \
    --rounds 2 --sizes 4032x3024 --runners-sweep 8 --output "$out/bench-large.json"
# Phone photos of 3.5 MB: as the default (GANNET_GPU_DECODE=auto) decodes them, then all
# by nvJPEG (all), then all on the runners' CPUs (off), side by side. Where the GPU has a
# JPEG engine (an H200), auto is all. Where it has none (a T4), torchvision's nvJPEG path
# decodes one photo at a time, its Huffman stage on the CPU of the one calling thread per
# process, so auto decodes these photos on the runners' cores: this says whether that
# was right (the "all" report's "decoding" column near 100 %: the thread binds; the
# report's jpeg_engine says what nvJPEG answered; docs/benchmark.md, "Phone photos").
phone() {  # phone NAME GANNET_GPU_DECODE
    step "$1" 150 env GANNET_GPU_DECODE="$2" python3 -m gannet bench --in-process \
        --device "$device" --images $((images / 8)) --rounds 2 --sizes phone --runners-sweep 8 \
        --output "$out/$1.json"
}
phone bench-phone auto
phone bench-phone-all-device all
phone bench-phone-cpu-decode off
# A mix of phone, drone and shelf shapes: batches form only among same-shaped inputs, so
# this is where the GPU's batches can stay small (the report's mean batch).
step bench-mix 150 python3 -m gannet bench --in-process --device "$device" --images "$images" \
    --rounds 2 --sizes mix --runners-sweep 8,16 --output "$out/bench-mix.json"
# The shipped pipelines, the work a T4 pod does: several models per photo (segmentation,
# detection, classification of crops) and sliced detection (about 80 tiles of a 12 MP
# photo). No bare model to compare: the report's "GPU busy" (NVML's utilisation) and "in
# forward" (the batchers' share of the time) say whether the daemon keeps the GPU busy.
pipeline() {  # pipeline NAME CONFIG:PIPELINE SIZES IMAGES
    step "$1" 150 python3 -m gannet bench --in-process --device "$device" --pipeline "$2" \
        --sizes "$3" --images "$4" --rounds 2 --runners-sweep 4,8 --output "$out/$1.json"
}
pipeline pipeline-agro configs/agro.yaml:FULL_PIPELINE 4032x3024,mix $((images / 4))
pipeline pipeline-sliced configs/agro.yaml:FIELD_ANALYSIS 4032x3024 $((images / 20))
pipeline pipeline-vending configs/vending.yaml:SHELF_AUDIT mix $((images / 4))
# Where the daemon's threads spend the CPU and hold the GIL at 640x480 with 16 runners
# (py-spy raw stacks; the runners' and batchers' stacks are the daemon's, with CUDA
# graphs and without in turns, the main thread's run_bare the bare model's).
profile() {  # profile NAME PY_SPY_OPTIONS...
    local name=$1
    shift
    step "$name" 100 py-spy record -r 200 --nonblocking -f raw -o "$out/$name.txt" "$@" -- \
        python3 -m gannet bench --in-process --device "$device" --sizes 640x480 \
        --images "$images" --rounds 1 --runners-sweep 16 --output "/tmp/$name.json"
}
profile profile-cpu
profile profile-gil --gil
exit $failed
