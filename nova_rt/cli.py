"""The `nova-rt` command: one subcommand per job.

    nova-rt train CONFIG [--set k=v ...]      any stage (run.stage), same as python -m nova_rt.train
    nova-rt merge CONFIG.yaml OUT_DIR [...]   mergekit-style YAML merge (streaming)
    nova-rt augment --model DIR "prompt" ...  PAS: append complementary prompts
    nova-rt plan --config X.yaml --gpus N     parallel layout, memory per GPU and step time (docs/plan.md)

Exit status 2 for a user error (one or two lines on stderr naming the file / row / field or key; NOVA_RT_DEBUG=1
shows the traceback); a traceback means a bug.
"""

from __future__ import annotations

import sys

from nova_rt.errors import UserError, debug_enabled


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    try:
        return _dispatch(cmd, rest)
    except UserError as exc:
        if debug_enabled():
            raise
        from nova_rt.train import report_user_error

        return report_user_error(exc, f"nova-rt {cmd}")


def _dispatch(cmd: str, rest: list[str]) -> int:
    if cmd == "train":
        from nova_rt.train import main as train_main

        if rest and not rest[0].startswith("-"):
            rest = ["--config", rest[0], *rest[1:]]
        return train_main(rest)
    if cmd == "merge":
        from nova_rt.merge.cli import main as merge_main

        return merge_main(rest)
    if cmd == "augment":
        from nova_rt.pas.cli import main as augment_main

        return augment_main(rest)
    if cmd == "plan":
        from nova_rt.plan.cli import main as plan_main

        return plan_main(rest)
    print(f"nova-rt: unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
