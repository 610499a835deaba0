"""`python -m nova_rt.train --config FILE [--set section.key=value ...]` (alone or under torchrun).

Runs the stage named by run.stage (sft, rm, dpo, grpo, pas, merge, pipeline).
"""

from __future__ import annotations

import argparse
import sys

from nova_rt.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nova_rt.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=10 (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from nova_rt.distributed import shutdown
    from nova_rt.stages import get_stage

    try:
        get_stage(cfg.run.stage)(cfg)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
