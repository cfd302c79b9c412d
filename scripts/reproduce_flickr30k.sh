#!/usr/bin/env bash
# Flickr30K (Karpathy split), every method x 100/200/500 pairs, then the tables in
# outputs/reproduce/flickr30k/. Needs a GPU and the data: dataset_flickr30k.json and the
# flickr30k-images folder under ${MMDISTILL_DATA:-../shared/data}/flickr30k (see README).
# Options as environment variables: see scripts/reproduce.sh.
exec "$(dirname "$0")/reproduce.sh" flickr30k
