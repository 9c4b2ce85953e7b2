#!/usr/bin/env bash
# Train the committed ResNet-20 runs (Fashion-MNIST; all-BN, and MN at layer3.*), two seeds each.
# Usage: bash checkpoints/train_resnet20.sh [train|record|all] [names...]   (names: bn mn bn-s1 mn-s1; JOBS=2)
#   train:  trains into $OUTROOT/resnet20-fmnist-NAME (default OUTROOT=checkpoints) with dense snapshots
#   record: records every normalization layer at every snapshot with the multimodality scan (cbnorm.record
#           --scan), then keeps only the first and last snapshot (the app reads the summaries)
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

record() {
  set -euo pipefail
  local name=$1 out="${OUTROOT:-checkpoints}/resnet20-fmnist-$1" values=128
  [[ $1 =~ -s([0-9]+)$ ]] && values=16   # seeds beyond the first: the scan and a few values per channel
  python -m cbnorm.record "$out" --size 64 --values-per-channel "$values" --scan --scan-values 1024
  python -m cbnorm.evaluate "$out" --check
  python - "$out" <<'PY'
import sys
from pathlib import Path
snaps = sorted(Path(sys.argv[1], "snapshots").glob("step_*.safetensors"))
for p in snaps[1:-1]:
    p.unlink()  # the summaries hold what the app shows; the first and last weights stay
PY
  rm -f "$out/resume.safetensors"
  du -sh "$out"
}

export -f train record
export COMMON
if [ "$WHAT" != record ]; then
  # declare -A does not export: pass the extra flags through the environment by name
  for n in "${NAMES[@]}"; do echo "$n"; done | \
    EXTRA_BN="${EXTRA[bn]}" EXTRA_MN="${EXTRA[mn]}" xargs -P "${JOBS:-2}" -I{} bash -c \
    'declare -A EXTRA=([bn]="$EXTRA_BN" [mn]="$EXTRA_MN"); train {}'
fi
if [ "$WHAT" != train ]; then
  for n in "${NAMES[@]}"; do record "$n"; done
fi
