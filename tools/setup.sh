#!/usr/bin/env bash
# Sets up a Debian 12 machine for lowbit, builds it in Release and runs the main job or the tests.
#
#   bash tools/setup.sh run    install what is missing, build, train LeNet-5 with QAT on Fashion-MNIST,
#                              convert it to the integer graph and evaluate the int8 model
#   bash tools/setup.sh test   install what is missing, build with warnings as errors, run every test
#   bash tools/setup.sh deps   only install what is missing (LOWBIT_CI_PACKAGES=1 adds clang, chromium, torch, cmark-gfm,
#                              python3-onnx, Node.js and ONNX Runtime for CI)
#
# Run as root (or with sudo available) from anywhere; the build goes to build/ in the repository.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${LOWBIT_BUILD_DIR:-$ROOT/build}"
JOBS="$(nproc)"

PACKAGES=(build-essential cmake libopenblas-dev libfmt-dev nlohmann-json3-dev doctest-dev zlib1g-dev
          libcli11-dev dataset-fashion-mnist binutils python3-numpy libonnx-dev libprotobuf-dev)
# CI only: clang + compiler-rt + libomp for the libFuzzer build, chromium for tests/test_inspect.cpp,
# python3-torch for tests/test_torch_parity.cpp (training step by step against PyTorch), cmark-gfm for
# .ci/markdown.sh (every markdown file renders as written), gcc-arm-none-eabi + qemu-system-arm for
# tests/test_export_c.cpp (tools/cortex-m/run.sh on an emulated Cortex-M3), python3-onnx (the ONNX checker) +
# nodejs + npm (ONNX Runtime from npm, install_ort) for tests/test_export_onnx.cpp
CI_PACKAGES=(clang libclang-rt-14-dev libomp-14-dev chromium python3-torch cmark-gfm gcc-arm-none-eabi qemu-system-arm
             python3-onnx nodejs npm)

# Installs the packages that are not installed yet; silent when everything is present.
install_missing() {
  local wanted=("${PACKAGES[@]}") missing=() pkg
  if [[ "${LOWBIT_CI_PACKAGES:-0}" == 1 ]]; then wanted+=("${CI_PACKAGES[@]}"); fi
  for pkg in "${wanted[@]}"; do
    # npm ships inside some Node.js builds (NodeSource); Debian's npm package would conflict with those.
    if [[ $pkg == npm ]] && command -v npm >/dev/null; then continue; fi
    if [[ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null)" != installed ]]; then missing+=("$pkg"); fi
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi
  echo "== installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ONNX Runtime (CPU) for Node.js into tools/ort/node_modules, at the version tools/ort/package-lock.json pins;
# --ignore-scripts: the package's install script would download CUDA files. Fails loudly if npm cannot.
install_ort() {
  [[ -d "$ROOT/tools/ort/node_modules/onnxruntime-node" ]] && return 0
  echo "== installing ONNX Runtime for Node.js (npm onnxruntime-node) into tools/ort/node_modules"
  (cd "$ROOT/tools/ort" && npm ci --ignore-scripts --no-audit --no-fund >/dev/null)
}

# Configures (Release) and builds into $BUILD; extra arguments go to the configure step.
build() {
  echo "== building lowbit (Release) in $BUILD"
  cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
  cmake --build "$BUILD" -j "$JOBS"
}

case "${1:-}" in
  run)
    install_missing
    build
    mkdir -p "$ROOT/out"
    cd "$ROOT"
    echo "== training lenet5 with QAT on Fashion-MNIST, converting it to the integer graph"
    "$BUILD/bin/train" --model lenet5 --qat --out out/lenet5.qat.safetensors
    echo "== evaluating the integer (int8) model"
    "$BUILD/bin/eval" --int8 --model out/lenet5.qat.int8.safetensors
    ;;
  test)
    install_missing
    if [[ "${LOWBIT_CI_PACKAGES:-0}" == 1 ]]; then install_ort; fi
    build -DLOWBIT_WERROR=ON -DLOWBIT_REQUIRE_ONNX=ON
    echo "== running the tests"
    cd "$BUILD"
    ctest --output-on-failure -j2
    ;;
  deps)
    install_missing
    if [[ "${LOWBIT_CI_PACKAGES:-0}" == 1 ]]; then install_ort; fi
    ;;
  *)
    echo "usage: bash tools/setup.sh run|test|deps" >&2
    exit 2
    ;;
esac
