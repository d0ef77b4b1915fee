#!/usr/bin/env bash
# Fetch, on this machine, the wheels bench/gpu_check.sh installs on a GPU host that lacks them:
# msgspec (verimed.core's messages; bench/gpu_learner.py) and Liger-Kernel (bench/kernels.py's
# rival rows), for the hosts' Python 3.12 on x86-64. They go to .whl/ (git-ignored through
# .git/info/exclude); the device runner carries them with `carry: [".whl"]`.
#
#   bash bench/gpu_wheels.sh        # ~1 MiB
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
msgspec=$(sed -n 's/.*"msgspec==\([^"]*\)".*/\1/p' pyproject.toml)
liger=$(sed -n 's/.*"liger-kernel==\([^"]*\)".*/\1/p' pyproject.toml)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "msgspec==${msgspec}" "liger-kernel==${liger}"
ls -l .whl
