#!/usr/bin/env bash
# Quickstart on the CPU: a 2M-parameter SR-DiT with every part of the recipe trained for 700
# steps on scikit-learn's digits (4.5 minutes on 2 cores, measured). Extra arguments are passed on,
# e.g. `bash scripts/quickstart.sh train.max_steps=300`. Rerunning resumes from runs/quickstart.
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m srdit.train --preset quickstart --out "${SRDIT_QUICKSTART_OUT:-runs/quickstart}" "$@"
