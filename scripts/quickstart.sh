#!/usr/bin/env bash
# Quickstart on the CPU: a 2M-parameter SR-DiT with every part of the recipe trained for 1,500
# steps on scikit-learn's digits (about 7 minutes on 2 cores). Extra arguments are passed on,
# e.g. `bash scripts/quickstart.sh train.max_steps=300`. Rerunning resumes from runs/quickstart.
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m srdit.train --preset quickstart --out "${SRDIT_QUICKSTART_OUT:-runs/quickstart}" "$@"
