#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): one call on the GPU machine, a few minutes.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [gpu_check.py options]     # OUT_DIR default: $OUT, else
#                                                                       # benchmarks/results/gpu_check
# The GPU machine has torch and torchvision but not Ray, pycocotools or raydet's other dependencies: build the
# offline bundle first (../shared/device/README.md) with raydet's small extras, and send .devbundle along:
#   EXTRA_PKGS="simplejpeg pytest tqdm tensorboardX" ../shared/device/make-device-bundle.sh
# raydet itself goes on the path as a copy of the source tree (raydet/ plus ops/ as raydet/ops), so nothing is built.
set -u
cd "$(dirname "$0")/.."
out_dir="${1:-${OUT:-benchmarks/results/gpu_check}}"
shift || true
mkdir -p "$out_dir"
if [ -f .devbundle/unpack-on-device.sh ]; then
    exports="$(sh .devbundle/unpack-on-device.sh)" || { echo "error: .devbundle/unpack-on-device.sh failed" >&2; exit 2; }
    eval "$exports"
fi
site=/tmp/raydet-site
rm -rf "$site" && mkdir -p "$site" && cp -r raydet "$site/raydet" && cp -r ops "$site/raydet/ops"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
exec python3 benchmarks/gpu_check.py --out "$out_dir" "$@"
