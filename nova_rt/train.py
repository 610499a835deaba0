"""`python -m nova_rt.train --config FILE [--set section.key=value ...]` (alone or under torchrun).

Runs the stage named by run.stage (sft, rm, dpo, grpo, pas, merge, pipeline). Exit status: 0 done; 2 a user error
(bad config, data, model or checkpoint file, a diverged run), printed as one or two lines naming the file / row /
field or key (under torchrun every rank exits 2 and only rank 0 prints it; NOVA_RT_DEBUG=1 shows the traceback);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time

from nova_rt.errors import UserError, debug_enabled


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nova_rt.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=10 (repeatable)")
    return p.parse_args(argv)


def report_user_error(exc: BaseException, prog: str = "nova_rt") -> int:
    """Print a user error as `prog: error: message` (plus a hint line) on stderr; returns the exit status 2.

    Under torchrun every rank exits 2, but only global rank 0 prints: the ranks of a run meet the same error, and one
    copy per rank buried the message. Every rank also writes it to torchrun's error file (TORCHELASTIC_ERROR_FILE),
    so torchrun's failure summary shows it for each failed rank in place of its pointer to tracebacks, and an error
    that only another rank met is not lost."""
    kind = {"ConfigError": "config error", "DataError": "data error", "CheckpointError": "checkpoint error",
            "NonFiniteError": "training stopped", "DiskFullError": "disk full"}.get(type(exc).__name__, "error")
    line = f"{prog}: {kind}: {exc}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        _write_elastic_error_file(error_file, line)
        # torchrun SIGTERMs the other workers once one has exited: one that is only shutting down after this same
        # error must still exit 2, not -15. Ignored, not blocked (a mask is per thread; torch's threads would take
        # it) nor handled (interpreter shutdown restores the default action); torchrun SIGKILLs after 30 s.
        with contextlib.suppress(ValueError):  # signal.signal outside the main thread
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not error_file or os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)
        print(f"{prog}: (NOVA_RT_DEBUG=1 shows the traceback)", file=sys.stderr)
    return 2


def _write_elastic_error_file(path: str, line: str) -> None:
    """torchrun's per-worker error file, in the layout torch.distributed.elastic reads (its `py_callstack` is what
    the failure summary prints, here the one-line message rather than a traceback)."""
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    with contextlib.suppress(OSError):
        with open(path, "w") as f:
            json.dump(data, f)


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
    from nova_rt.disk import disk_writes
    from nova_rt.distributed import shutdown
    from nova_rt.stages import get_stage

    try:
        with disk_writes(cfg.run.dir, "the run's outputs", name_failed_file=True):  # those no writer names
            get_stage(cfg.run.stage)(cfg)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
