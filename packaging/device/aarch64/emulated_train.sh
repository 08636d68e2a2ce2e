#!/usr/bin/env bash
# The TensorFlow-free device trainer on a 64-bit ARM CPU, as on a Raspberry Pi 4 with a 64-bit OS
# (its Cortex-A72, emulated here with qemu-user): an arm64 Python (Debian's), the aarch64 wheels of the device's
# dependencies and the tfsplit-device wheel built from this clone, training the smoke config
# against a tfsplit-train-server on this host (x86-64, loopback).
#
#   sudo bash packaging/device/aarch64/emulated_train.sh [scratch dir, default /tmp/tfsplit-arm64]
#
# Needs: a Debian or Ubuntu host with apt (root: it adds the arm64 architecture to apt's lists to
# download arm64 packages; nothing arm64 is installed, the packages are unpacked into the scratch
# dir), and tfsplit installed on the host (`python3 -m pip install -e .`). About 5 minutes, most
# of them the emulated device. Prints the device's summary and the server's accepted steps; exits
# non-zero when anything fails.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../../.." && pwd)"
scratch="${1:-/tmp/tfsplit-arm64}"
config="$repo/configs/deprune.py:smoke"
# The smoke variant's sizes are the shards' own here (shards fix them).
data=(--config.data.name=shards --config.data.path=shards --config.data.train_size=0
  --config.data.test_size=0)
mkdir -p "$scratch"/{debs,wheels}
cd "$scratch"

echo "== qemu-user and an arm64 Python 3.11 (unpacked, not installed)"
if [ ! -x qemu/usr/bin/qemu-aarch64-static ]; then
  (cd debs && apt-get download -q qemu-user-static)
  dpkg -x debs/qemu-user-static_*.deb qemu
fi
qemu="$scratch/qemu/usr/bin/qemu-aarch64-static"
if [ ! -x sysroot/usr/bin/python3.11 ]; then
  dpkg --add-architecture arm64
  apt-get update -q
  packages=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
    --no-breaks --no-replaces --no-enhances \
    python3.11-minimal:arm64 libpython3.11-stdlib:arm64 libstdc++6:arm64 \
    | grep '^[a-z].*:arm64$' | grep -v '^\(dpkg\|install-info\|tar\):' | sort -u)
  (cd debs && apt-get download -q $packages)
  for deb in debs/*_arm64.deb; do dpkg -x "$deb" sysroot; done
fi
python_arm64=(env -u PYTHONPATH "$qemu" -cpu cortex-a72 -L "$scratch/sysroot" -E "PYTHONPATH=$scratch/site"
  "$scratch/sysroot/usr/bin/python3.11")

echo "== the device's wheels for aarch64, and tfsplit-device from this clone"
rm -rf site wheels/tfsplit_device-*.whl && mkdir -p site
python3 -m pip wheel -q --no-deps --wheel-dir wheels "$repo/packaging/device"
python3 -m pip download -q --only-binary=:all: --dest wheels --python-version 3.11 \
  --implementation cp --abi cp311 --abi abi3 --abi none --platform manylinux_2_27_aarch64 \
  --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
  --platform manylinux2014_aarch64 wheels/tfsplit_device-*.whl
for wheel in wheels/*.whl; do python3 -m zipfile -e "$wheel" site; done
"${python_arm64[@]}" -c "import platform, sys, numpy, grpc, ai_edge_litert, tfsplit.device.training.trainer
assert platform.machine() == 'aarch64' and 'tensorflow' not in sys.modules
print('arm64 Python', sys.version.split()[0], 'numpy', numpy.__version__, 'grpcio', grpc.__version__)"

echo "== on the host: the shards, the trainable head and the server"
rm -rf shards head server device
tfsplit-prepare-data --dataset=synthetic --num_shards=2 --train_size=256 --test_size=128 \
  --out=shards
tfsplit-export --config="$config" "${data[@]}" --trainable --out=head
port=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
tfsplit-train-server --config="$config" "${data[@]}" --workdir=server --port="$port" \
  > server.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null && break
  sleep 1
done

echo "== the emulated arm64 device trains against it"
start=$(date +%s)
# qemu-user before 8.0 shows the emulated program the host's own /proc/cpuinfo, and LiteRT's CPU
# detection (cpuinfo, for its GEMM kernels and XNNPACK) crashes on an x86 one: the device runs in
# a mount namespace of its own whose /proc/cpuinfo is a Raspberry Pi 4's.
unshare --mount bash -c 'mount --bind "$0" /proc/cpuinfo && exec "$@"' \
  "$repo/packaging/device/aarch64/cpuinfo_pi4" "${python_arm64[@]}" -m tfsplit_tools.device_train \
  --model_dir=head --data=shards --workdir=device --server="127.0.0.1:$port"
echo "device run: $(( $(date +%s) - start )) s under emulation"
cat device/summary.json && echo
echo "the server's record of the device's steps (state.json: the next step it expects):"
python3 -c "import json; print(json.load(open('server/state.json'))['devices'])"
