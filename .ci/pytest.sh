#!/usr/bin/env bash
# Runs the CPU test suite. pytest exits 5 when it collected no test: that is a failure here, as is any other
# non-zero code. GPU tests are marked `gpu`/`multigpu` and deselected explicitly on CPU machines.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then MARK="not multigpu"; else MARK="not gpu and not multigpu"; fi
$PY -m pytest -m "$MARK" -p no:cacheprovider "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit $rc
