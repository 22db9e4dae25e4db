#!/usr/bin/env bash
# Reverse distillation's length on a GPU (issue 13): where Tutor1 sits and what tutor + delta keeps
# after 10 / 20 / 40 / 80 epochs of RD with the candidate setting (the backbone trained, the edge's
# features aligned, alpha 1000), Exp 1's customer, seed 0. One prepared command:
#
#     bash bench/rd_lengths.sh              # EPOCHS="10 20 40 80" THREADS=3 OUT=rd-lengths by default
#
# The manufacturer is trained (or read from .cache/diredi-sim) first, alone, so that the parallel
# runs do not race for its cache; then one bench/rd_emulation.py process per length, side by side
# (device "auto": the GPU when there is one). Each process's figures go to $OUT/rd-<epochs>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-rd-lengths}
threads=${THREADS:-3}
mkdir -p "$out"
python=${PYTHON:-python}
start=$(date +%s)
$python bench/rd_emulation.py --set threads="$threads" --set pipeline.rd.epochs=1 > "$out/manufacturer.txt" 2>&1
echo "manufacturer ready (and a 1-epoch RD) in $(( $(date +%s) - start )) s"
pids=()
for e in ${EPOCHS:-10 20 40 80}; do
  $python bench/rd_emulation.py --set threads="$threads" --set pipeline.rd_align=edge --set pipeline.freeze_backbone=false \
    --set pipeline.alpha=1000 --set pipeline.rd.epochs="$e" > "$out/rd-$e.txt" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
echo "all lengths in $(( $(date +%s) - start )) s"
for e in ${EPOCHS:-10 20 40 80}; do echo "== $e epochs"; tail -n 25 "$out/rd-$e.txt"; done
exit $status
