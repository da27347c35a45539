#!/usr/bin/env bash
# The test suite: CPU only, Triton kernels under the interpreter (TRITON_INTERPRET=1).
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest -q -p no:cacheprovider tests "$@"
