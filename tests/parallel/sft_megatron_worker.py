"""torchrun worker: `python -m nova_rt.train` with parallel.backend=megatron on CPU (test-only shims applied first)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.parallel import megatron_cpu_shims  # noqa: E402

megatron_cpu_shims.apply()

from nova_rt.train import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
