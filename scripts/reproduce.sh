#!/usr/bin/env bash
# The papers' sweep on one dataset: full-data upper bound, expert buffers, every method x
# 100/200/500 pairs, then the tables. Used by reproduce_{flickr30k,coco,flickr8k}.sh.
#
#   scripts/reproduce.sh flickr30k          # or coco, flickr8k
#
# Environment (all optional):
#   ENCODER   student encoder (default nfnet_bert, the papers' NFNet-l0 + BERT; needs a GPU)
#   METHODS   space-separated methods (default: random herding kcenter forgetting mtt tesla lors covmatch)
#   BUDGETS   comma-separated pairs (default 100,200,500)
#   SEEDS     comma-separated distillation seeds (default 0)
#   LAUNCHER  Hydra launcher overrides, e.g. "hydra/launcher=slurm hydra.launcher.partition=gpu"
#             or "hydra/launcher=joblib hydra.launcher.n_jobs=4" (default: one job after another)
#   EXTRA     more overrides for every job (e.g. "debug=tiny" for a dry run of the code path)
#   OUT       where the runs and tables go (default outputs/reproduce/<dataset>)
#   INTO      also put the Markdown table into this document's generated section
#   DRY=1     print the commands instead of running them
# Relaunching the same command skips finished jobs and resumes interrupted ones.
set -uo pipefail
DATASET=${1:?usage: reproduce.sh <flickr30k|coco|flickr8k>}
ENCODER=${ENCODER:-nfnet_bert}
METHODS=${METHODS:-random herding kcenter forgetting mtt tesla lors covmatch}
BUDGETS=${BUDGETS:-100,200,500}
SEEDS=${SEEDS:-0}
LAUNCHER=${LAUNCHER:-}
EXTRA=${EXTRA:-}
OUT=${OUT:-outputs/reproduce/$DATASET}
INTO=${INTO:-}
DRY=${DRY:-}
CONF=$(dirname "$0")/../conf
status=0
# LAUNCHER and EXTRA are lists of overrides: they are expanded unquoted on purpose.
run() {
  echo "+ mmdistill $*" >&2
  [[ -n "$DRY" ]] || mmdistill "$@" || status=1
}

# The bar every row is measured against.
run train dataset="$DATASET" encoder="$ENCODER" $EXTRA hydra.run.dir="$OUT/full"

# Trajectory methods share one expert buffer per dataset/encoder: build it in parallel first.
if [[ " $METHODS " =~ " "(mtt|tesla|lors)" " ]]; then
  experts=$(sed -n 's/^num_experts: *\([0-9]*\).*/\1/p' "$CONF/expert/default.yaml")
  [[ -f "$CONF/experiment/mtt_${DATASET}_100.yaml" ]] && experts=20  # the papers' buffer
  run buffer -m dataset="$DATASET" encoder="$ENCODER" expert.num_experts="$experts" \
    expert.index="$(seq -s, 0 $((experts - 1)))" $LAUNCHER $EXTRA \
    hydra.sweep.dir="$OUT/buffer"
fi

# A method with a paper preset per budget (conf/experiment/<method>_<dataset>_<pairs>.yaml) runs
# the preset, with its own evaluation protocol; the others run their config defaults.
plain=()
for m in $METHODS; do
  presets=()
  for b in ${BUDGETS//,/ }; do
    [[ -f "$CONF/experiment/${m}_${DATASET}_${b}.yaml" ]] && presets+=("${m}_${DATASET}_${b}")
  done
  if ((${#presets[@]})); then
    list=$(IFS=,; echo "${presets[*]}")
    run distill -m experiment="$list" seed="$SEEDS" $LAUNCHER $EXTRA \
      hydra.sweep.dir="$OUT/$m"
  else
    plain+=("$m")
  fi
done
if ((${#plain[@]})); then
  list=$(IFS=,; echo "${plain[*]}")
  run distill -m dataset="$DATASET" encoder="$ENCODER" method="$list" budget.pairs="$BUDGETS" \
    seed="$SEEDS" $LAUNCHER $EXTRA hydra.sweep.dir="$OUT/methods"
fi

# Tables from whatever finished (failed jobs were listed above; relaunch to retry them).
if [[ -n "$INTO" ]]; then
  run table "$OUT" --out "$OUT" --into "$INTO" --section "$DATASET ($ENCODER)"
else
  run table "$OUT" --out "$OUT"
fi
exit $status
