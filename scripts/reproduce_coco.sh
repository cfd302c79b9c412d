#!/usr/bin/env bash
# MS-COCO (Karpathy split), every method x 100/200/500 pairs, then the tables in
# outputs/reproduce/coco/. Needs a GPU and the data: dataset_coco.json with train2014/ and
# val2014/ under ${MMDISTILL_DATA:-../shared/data}/coco (see README).
# Options as environment variables: see scripts/reproduce.sh.
exec "$(dirname "$0")/reproduce.sh" coco
