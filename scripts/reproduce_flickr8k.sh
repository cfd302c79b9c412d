#!/usr/bin/env bash
# The CPU benchmark (docs BENCHMARK.md): flickr8k-1k from the shared data, frozen
# EfficientNet-Lite0 + MiniLM features, the full-data row and every method x 100/200/500 pairs,
# two jobs at a time; the tables land in outputs/reproduce/flickr8k/ and the Markdown table
# replaces the generated flickr8k section of docs/results.md.
# Options as environment variables: see scripts/reproduce.sh (METHODS, SEEDS, LAUNCHER, ...).
export ENCODER=${ENCODER:-lite0_minilm}
export LAUNCHER=${LAUNCHER-"hydra/launcher=joblib hydra.launcher.n_jobs=2"}
export INTO=${INTO:-$(dirname "$0")/../docs/results.md}
exec "$(dirname "$0")/reproduce.sh" flickr8k
