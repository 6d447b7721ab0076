#!/usr/bin/env bash
# Set up once, then run the whole pipeline on a local Ray (or the cluster in RAY_ADDRESS):
#   prepare -> train -> evaluate on the held-out test split -> score the test images.
#
#   bash scripts/run.sh DATA OUT
#
# Knobs (environment): BACKBONE (a timm model; default resnet50 from timm's hub, or
# tf_efficientnet_lite0 with the weights installed with the project where the hub is unreachable),
# PRETRAINED_FILE (local ImageNet weights for BACKBONE), MODE (partial|frozen|finetune) and EPOCHS
# (default: the CPU recipe of `age quickstart --help`), VERBOSE=1 (Ray's own logs on the terminal too).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: scripts/run.sh DATA OUT}
OUT=${2:?usage: scripts/run.sh DATA OUT}
# setup.sh runs again only when it or the project's dependencies change (it writes the stamp)
WANT=$(cat scripts/setup.sh pyproject.toml | sha1sum | cut -d' ' -f1)
if [ "$(cat .venv/.agecore-setup 2>/dev/null)" != "$WANT" ]; then
    echo "setting up .venv (once; a few minutes)" >&2
    bash scripts/setup.sh
fi
ARGS=()
[ -n "${MODE:-}" ] && ARGS+=(--mode "$MODE")
[ -n "${EPOCHS:-}" ] && ARGS+=(--epochs "$EPOCHS")
[ -n "${BACKBONE:-}" ] && ARGS+=(--backbone "$BACKBONE")
[ -n "${PRETRAINED_FILE:-}" ] && ARGS+=(--pretrained-file "$PRETRAINED_FILE")
[ "${VERBOSE:-0}" = 1 ] && ARGS+=(--verbose)
exec .venv/bin/age quickstart "$DATA" "$OUT" "${ARGS[@]}"
