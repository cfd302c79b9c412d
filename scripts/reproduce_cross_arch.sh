#!/usr/bin/env bash
# The cross-architecture matrix on flickr8k-1k (CPU): every source encoder x method distilled at
# BUDGET pairs, each set evaluated by every other encoder in EVALUATORS (decoded coresets for
# these feature-space sets), plus each evaluator's full-data row; then `mmdistill table
# --cross-arch` writes cross_arch.md / cross_arch.csv into OUT. Finished runs are skipped, so a
# relaunch continues. Environment: SOURCES, METHODS, EVALUATORS, BUDGET, SEED, EXTRA (overrides
# added to every run), OUT, INTO (a document to put the matrix into), DRY=1 (print the commands).
set -euo pipefail
SOURCES=${SOURCES:-"lite0_minilm"}
METHODS=${METHODS:-"random covmatch lors"}
EVALUATORS=${EVALUATORS:-"lite0_minilm lite1_minilm lite2_minilm"}
BUDGET=${BUDGET:-100}
SEED=${SEED:-0}
EXTRA=${EXTRA:-"threads=1"}
OUT=${OUT:-outputs/cross_arch}
MMDISTILL=${MMDISTILL:-mmdistill}

run() {
  if [ "${DRY:-0}" = 1 ]; then echo "$MMDISTILL $*"; else $MMDISTILL "$@"; fi
}

common=(dataset=flickr8k "seed=$SEED" $EXTRA)
for e in $EVALUATORS; do
  run train "encoder=$e" "${common[@]}" "hydra.run.dir=$OUT/full/$e"
done
for s in $SOURCES; do
  for m in $METHODS; do
    src="$OUT/src/$s/$m-$BUDGET"
    run distill "encoder=$s" "method=$m" "budget.pairs=$BUDGET" "${common[@]}" "hydra.run.dir=$src"
    for e in $EVALUATORS; do
      [ "$e" = "$s" ] && continue
      run evaluate "source=$src" "encoder=$e" "${common[@]}" "hydra.run.dir=$OUT/eval/$s-$m-$BUDGET/$e"
    done
  done
done
into=()
[ -n "${INTO:-}" ] && into=(--into "$INTO" --section cross-arch)
run table "$OUT" --cross-arch "${into[@]}"
