#!/usr/bin/env bash
# Retrain every committed run (Fashion-MNIST, shallow CNN at width 0.25, conv3's norm replaced).
# Usage: bash checkpoints/train_all.sh [names...]   (default: all; JOBS=2 runs in parallel, THREADS=1 each)
# Names: bn ln gn mn mode acn cn cnx cn-embed, and the extra seeds bn-s1 bn-s2 mn-s1 mn-s2 acn-s1 acn-s2.
# A finished run is skipped, an interrupted one resumed (the same command continues). OUTROOT=DIR trains into
# DIR/fmnist-NAME instead of checkpoints/ (to retrain beside the committed runs, then swap them in).
set -euo pipefail
cd "$(dirname "$0")/.."
COMMON="--dataset fashion-mnist --model shallow_cnn --width 0.25 --layers conv3 --epochs 5 --batch-size 128
  --limit-train 30000 --lr 2e-3 --weight-decay 1e-4 --optimizer adamw --eval-every 50 --eval-subset 2000
  --threads ${THREADS:-1} --quiet --record-size 0"   # recorded after training, at the committed size (below)
SNAP="--snapshot-every 117 --snapshot-early 6"   # seed-0 runs: 17 snapshots, dense early
CURVE="--snapshot-every 0"                       # extra seeds (curves only): first and last snapshot
declare -A EXTRA=(
  [bn]="--norm bn" [ln]="--norm ln" [gn]="--norm gn"
  [mn]="--norm mn --components 3" [mode]="--norm mode --components 3"
  [acn]="--norm acn --components 3 --norm-kwargs {\"init\":\"data\"}"
  [cn]="--norm cn --contexts superclass --context-head" [cnx]="--norm cnx --contexts superclass --context-head"
  [cn-embed]="--norm cn-embed --contexts superclass --context-head"
)
NAMES=("$@")
[ ${#NAMES[@]} -eq 0 ] && NAMES=(bn mn acn bn-s1 mn-s1 acn-s1 bn-s2 mn-s2 acn-s2 ln gn mode cn cnx cn-embed)

one() {  # one run: NAME[-sSEED]
  set -euo pipefail
  local name=$1 norm=${1%-s[0-9]*} seed=0 snaps=$SNAP
  [[ $1 =~ -s([0-9]+)$ ]] && { seed=${BASH_REMATCH[1]}; snaps=$CURVE; }
  local out="${OUTROOT:-checkpoints}/fmnist-$name"
  if [ -f "$out/metrics.json" ] && python -c "import json,sys; m=json.load(open('$out/metrics.json')); \
      sys.exit(0 if m.get('epochs_done', 0) >= 5 else 1)"; then
    echo "== $out: done"; return 0
  fi
  if [ -f "$out/config.json" ]; then
    python -m cbnorm.train --out "$out" --resume --quiet --threads "${THREADS:-1}"
  else
    # shellcheck disable=SC2086
    python -m cbnorm.train $COMMON $snaps ${EXTRA[$norm]} --seed "$seed" --out "$out"
  fi
  python -m cbnorm.evaluate "$out" --check
  # the committed summaries: conv3 only, small (13.5 MB for the 15 runs; see checkpoints/README.md)
  python -m cbnorm.record "$out" --size 128 --values-per-channel 256 --layers blocks.conv3.norm
  rm -f "$out/resume.safetensors"  # optimizer state: not needed by the app
  echo "== $out: trained"
}
export -f one
export COMMON SNAP CURVE THREADS OUTROOT
export EXTRA_DEF="$(declare -p EXTRA)"
printf '%s\n' "${NAMES[@]}" | xargs -P "${JOBS:-2}" -I{} bash -c 'eval "$EXTRA_DEF"; one "$1"' _ {}
