"""The `nova-rt` command: one subcommand per job.

    nova-rt train CONFIG [--set k=v ...]      any stage (run.stage), same as python -m nova_rt.train
    nova-rt merge CONFIG.yaml OUT_DIR [...]   mergekit-style YAML merge (streaming)
    nova-rt augment --model DIR "prompt" ...  PAS: append complementary prompts
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
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
    print(f"nova-rt: unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
