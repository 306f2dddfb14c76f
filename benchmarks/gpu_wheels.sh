#!/usr/bin/env bash
# Wheels for an offline GPU box (benchmarks/gpu_check.py installs them there when imports are missing).
#
# A typical GPU image has torch, numpy, OpenCV, TensorBoard, tqdm and pytest, but not tyro, gymnasium or
# ale-py, and no network. On a machine WITH network (any OS; pip only downloads), run:
#
#     bash benchmarks/gpu_wheels.sh                 # -> benchmarks/wheels/ (git ignores it)
#     bash benchmarks/gpu_wheels.sh DIR 3.11        # another folder, another Python of the GPU box
#
# then copy the repo (wheels included) to the GPU box and run `python benchmarks/gpu_check.py` there.
# It fetches tyro, gymnasium and ale-py with all their dependencies as binary wheels for CPython
# <version> (default 3.12) on manylinux x86_64. gpu_check.py installs only those whose distribution the
# box lacks (no dependency resolution there, into a folder of its own), so the box's numpy stays.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-$here/wheels}"
py="${2:-3.12}"
pip_cmd=(python3 -m pip)
if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "error: python3 -m pip is not available here; install pip (or run from a venv) and rerun." >&2
  exit 1
fi
mkdir -p "$dest"
platforms=()
for p in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
  platforms+=(--platform "$p")
done
# the same lower bounds as requirements.txt
"${pip_cmd[@]}" download --disable-pip-version-check --only-binary=:all: --implementation cp \
  --python-version "$py" "${platforms[@]}" --dest "$dest" \
  "tyro>=0.9" "gymnasium>=1.0" "ale-py>=0.10"
echo "wheels for CPython $py in $dest:"
ls -1 "$dest"/*.whl
echo "copy the repo with this folder to the GPU box, then: python benchmarks/gpu_check.py --out-dir DIR"
