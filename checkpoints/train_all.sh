#!/usr/bin/env bash
# Retrain every committed run (Fashion-MNIST, shallow CNN at width 0.25, conv3's norm replaced).
# Usage: bash checkpoints/train_all.sh [names...]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
COMMON=(--dataset fashion-mnist --model shallow_cnn --width 0.25 --layers conv3 --epochs 2 --batch-size 128
        --lr 2e-3 --weight-decay 1e-4 --optimizer adamw --seed 0 --snapshot-every 94 --threads "${THREADS:-1}" --quiet)
declare -A EXTRA=(
  [bn]="--norm bn" [ln]="--norm ln" [gn]="--norm gn"
  [mn]="--norm mn --components 3" [mode]="--norm mode --components 3" [acn]="--norm acn --components 3 --norm-kwargs {\"init\":\"data\"}"
  [cn]="--norm cn --contexts superclass --context-head" [cnx]="--norm cnx --contexts superclass --context-head"
  [cn-embed]="--norm cn-embed --contexts superclass --context-head"
)
NAMES=("$@")
[ ${#NAMES[@]} -eq 0 ] && NAMES=(bn ln gn mn mode acn cn cnx cn-embed)
for name in "${NAMES[@]}"; do
  echo "== fmnist-$name"
  # shellcheck disable=SC2086
  python -m cbnorm.train "${COMMON[@]}" ${EXTRA[$name]} --out "checkpoints/fmnist-$name"
  python -m cbnorm.evaluate "checkpoints/fmnist-$name" --check
  rm -f "checkpoints/fmnist-$name/resume.safetensors"  # optimizer state: not needed by the app
done
