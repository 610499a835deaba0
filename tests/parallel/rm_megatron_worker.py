"""torchrun worker: several `nova_rt.train` runs with parallel.backend=megatron in one launch (each launch costs
seconds of CPU on its own), on CPU with the test-only shims applied first.

    torchrun --nproc_per_node=2 tests/parallel/rm_megatron_worker.py SPEC.json

SPEC.json: {"config": yaml path, "runs": [[KEY=VALUE overrides of run 1], [... run 2], ...]}. Every run gets its own
megatron model-parallel groups (destroyed after it); the process group lives across runs. An entry {"remove": [paths]}
in place of a run deletes those directories (rank 0) between the runs before and after it.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.parallel import megatron_cpu_shims  # noqa: E402

megatron_cpu_shims.apply()


def main() -> None:
    import gc

    from megatron.core import parallel_state as ps

    from nova_rt.config import load_config
    from nova_rt.distributed import shutdown
    from nova_rt.stages import get_stage

    spec = json.loads(Path(sys.argv[1]).read_text())
    try:
        for overrides in spec["runs"]:
            if isinstance(overrides, dict):
                import shutil

                import torch.distributed as dist

                if dist.get_rank() == 0:
                    for path in overrides["remove"]:
                        shutil.rmtree(path)
                dist.barrier()
                continue
            cfg = load_config(spec["config"], overrides)
            get_stage(cfg.run.stage)(cfg)
            gc.collect()
            ps.destroy_model_parallel()
        megatron_cpu_shims.check()
    finally:
        shutdown()


if __name__ == "__main__":
    main()
