"""`python -m nova_rt.train --config FILE [--set section.key=value ...]` (alone or under torchrun).

Runs the stage named by run.stage (sft, rm, dpo, grpo, pas, merge, pipeline). Exit status: 0 done; 2 a user error
(bad config, data, model or checkpoint file, a diverged run), printed as one or two lines naming the file / row /
field or key (every rank exits 2 under torchrun; NOVA_RT_DEBUG=1 shows the traceback); anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from nova_rt.errors import UserError, debug_enabled


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nova_rt.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=10 (repeatable)")
    return p.parse_args(argv)


def report_user_error(exc: BaseException, prog: str = "nova_rt") -> int:
    """Print a user error as `prog: error: message` (plus a hint line) on stderr; returns the exit status 2."""
    kind = {"ConfigError": "config error", "DataError": "data error", "CheckpointError": "checkpoint error",
            "NonFiniteError": "training stopped"}.get(type(exc).__name__, "error")
    print(f"{prog}: {kind}: {exc}", file=sys.stderr)
    print(f"{prog}: (NOVA_RT_DEBUG=1 shows the traceback)", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _run(args)
    except (UserError, FileNotFoundError) as exc:  # FileNotFoundError: a path the user gave (its message names it)
        if debug_enabled():
            raise
        return report_user_error(exc)


def _run(args: argparse.Namespace) -> int:
    from nova_rt.config import load_config
    from nova_rt.preflight import check_inputs

    cfg = load_config(args.config, args.overrides)
    check_inputs(cfg)
    from nova_rt.distributed import shutdown
    from nova_rt.stages import get_stage

    try:
        get_stage(cfg.run.stage)(cfg)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
