#!/usr/bin/env bash
# Train the committed ResNet-20 runs (Fashion-MNIST; all-BN, and MN at layer3.*), two seeds each.
# Usage: bash checkpoints/train_resnet20.sh [train|record|all] [names...]   (names: bn mn bn-s1 mn-s1; JOBS=2)
#   train:  trains into $OUTROOT/resnet20-fmnist-NAME (OUTROOT: a scratch folder outside checkpoints/, e.g.
#           /tmp/r20) with 17 snapshots (6 log-spaced early ones, then every 94 steps)
#   record: records every normalization layer at the snapshots of KEEP_STEPS with the multimodality scan
#           (cbnorm.record --scan: 32 test images, 64 values per channel kept, the scan on 1,024), then copies
#           seed 0's run into checkpoints/ without its snapshots (the 60 MB budget: the app reads the
#           summaries; the final weights stay). Seeds >= 1 stay in OUTROOT (bench/premise.py --extra), and
#           bench/premise.py reads every run's 17 snapshots there for P3.
# A finished run is skipped, an interrupted one resumed (the same command continues).
set -euo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-all}; shift || true
COMMON="--dataset fashion-mnist --model resnet20 --width 1 --epochs 2 --batch-size 128 --optimizer sgd --lr 0.05
  --momentum 0.9 --weight-decay 5e-4 --schedule cosine --eval-every 94 --eval-subset 2000
  --snapshot-every 94 --snapshot-early 6 --record-size 0 --threads ${THREADS:-1} --quiet"
declare -A EXTRA=([bn]="--norm bn" [mn]="--norm mn --components 3 --layers layer3.*")
NAMES=("$@")
[ ${#NAMES[@]} -eq 0 ] && NAMES=(bn mn bn-s1 mn-s1)

train() {
  set -euo pipefail
  local name=$1 norm=${1%-s[0-9]*} seed=0
  [[ $1 =~ -s([0-9]+)$ ]] && seed=${BASH_REMATCH[1]}
  local out="${OUTROOT:-checkpoints}/resnet20-fmnist-$name"
  if [ -f "$out/metrics.json" ] && python -c "import json,sys; m=json.load(open('$out/metrics.json')); \
      sys.exit(0 if m.get('epochs_done', 0) >= 2 else 1)"; then
    echo "== $out: trained"; return 0
  fi
  if [ -f "$out/config.json" ]; then
    python -m cbnorm.train --out "$out" --resume --quiet --threads "${THREADS:-1}"
  else
    # shellcheck disable=SC2086
    python -m cbnorm.train $COMMON ${EXTRA[$norm]} --seed "$seed" --out "$out"
  fi
}

record() {  # in $OUTROOT: every snapshot recorded with the scan; seed 0 then copied into checkpoints/
  set -euo pipefail
  local name=$1 src="${OUTROOT:-checkpoints}/resnet20-fmnist-$1" dest="checkpoints/resnet20-fmnist-$1"
  if ! ls "$src/summaries/"step_*.safetensors > /dev/null 2>&1; then
    # shellcheck disable=SC2086
    python -m cbnorm.record "$src" --size 32 --values-per-channel 64 --scan --scan-values 1024 --steps $KEEP_STEPS
  fi
  [[ $1 =~ -s([0-9]+)$ ]] && return 0   # seeds beyond the first: their figures go to bench/results/premise.json
  [ "$(cd "$src" && pwd)" = "$(mkdir -p "$dest" && cd "$dest" && pwd)" ] && { echo "OUTROOT must not be checkpoints"; return 1; }
  rm -rf "$dest" && mkdir -p "$dest/summaries"
  cp "$src"/config.json "$src"/metrics.json "$src"/model.safetensors "$src"/status.json "$dest"/
  [ -f "$src/metrics.jsonl" ] && cp "$src/metrics.jsonl" "$dest"/
  cp "$src"/summaries/step_*.safetensors "$dest/summaries/"
  python -m cbnorm.evaluate "$dest" --check
  du -sh "$dest"
}
# the recorded steps (of the 17 snapshots): the initialisation, two early ones, two over the two epochs
KEEP_STEPS="0 5 44 188 936"

export -f train record
export COMMON KEEP_STEPS
if [ "$WHAT" != record ]; then
  # declare -A does not export: pass the extra flags through the environment by name
  for n in "${NAMES[@]}"; do echo "$n"; done | \
    EXTRA_BN="${EXTRA[bn]}" EXTRA_MN="${EXTRA[mn]}" xargs -P "${JOBS:-2}" -I{} bash -c \
    'declare -A EXTRA=([bn]="$EXTRA_BN" [mn]="$EXTRA_MN"); train {}'
fi
if [ "$WHAT" != train ]; then
  for n in "${NAMES[@]}"; do record "$n"; done
fi
