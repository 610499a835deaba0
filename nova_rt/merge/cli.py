"""`nova-rt merge CONFIG.yaml OUT_DIR`: merge local HF checkpoints as a mergekit-style YAML describes.

nova_rt's top-level CLI forwards `nova-rt merge ...` here; `python -m nova_rt.merge.cli ...` works too.
Exit status: 0 merged, 2 bad config / inputs / existing output without --force / an output that holds an input or
lies in one (a one-line message on stderr; --force replaces only an output that holds no input).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys


class _HelpWithMethods(argparse.ArgumentParser):
    """--help ends with every merge method and its parameters (torch is imported only when help is printed)."""

    def format_help(self) -> str:
        import nova_rt.merge.methods  # noqa: F401 - registers the methods
        from nova_rt.merge.registry import describe_methods

        self.epilog = describe_methods()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    p = _HelpWithMethods(prog="nova-rt merge", description=__doc__.splitlines()[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="mergekit-style YAML (merge_method, base_model, models, parameters, dtype, ...); a "
                                  "model may be a PEFT LoRA adapter directory or BASE+ADAPTER (docs/lora.md)")
    p.add_argument("out_dir", help="output HF directory (created atomically)")
    p.add_argument("--device", default="cpu", help="where the merge math runs: cpu or cuda[:i] (default: cpu)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT_DIR if it exists (never when an input model, tokenizer or the config is in it)")
    p.add_argument("--max-shard-size", default="5GB", help="output shard size, e.g. 2GB, 500MB (default: 5GB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--random-seed", type=int, default=0, help="seed of the DARE drop masks (default: 0)")
    p.add_argument("--impl", choices=("auto", "ext", "torch"), default="auto",
                   help="merge kernels: the C++/CUDA extension, the PyTorch reference, or auto (default)")
    p.add_argument("--block-mb", type=float, default=None, metavar="MIB",
                   help="merge a tensor larger than this per model in row blocks of about this size, which bounds "
                        "memory with the same output (default: 256; 0: every tensor whole; docs/merge.md)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads of the merge ops (default: OMP_NUM_THREADS, else every core)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "torch" not in sys.modules:
        # A fresh process (the console script): OpenMP threads that wait at a barrier sleep instead of spinning. On
        # a shared 2-core machine spinning cost ~1.3 s of CPU per 0.5B merge (2026-11-21). An explicit setting wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS threads: the merge does no BLAS
    # The merge creates no reference cycles worth collecting; pausing the collector saves ~0.4 s of torch's import
    # and per-tensor collections. Re-enabled on return for in-process callers.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        from nova_rt.merge.config import MergeConfigError
        from nova_rt.merge.engine import run_merge

        try:
            out = run_merge(args.config, args.out_dir, device=args.device, force=args.force,
                            max_shard_size=args.max_shard_size, progress=not args.no_progress, seed=args.random_seed,
                            impl=args.impl, threads=args.threads,
                            **({} if args.block_mb is None else {"block_mb": args.block_mb}))
        except (MergeConfigError, FileExistsError, FileNotFoundError, ValueError) as exc:
            print(f"nova-rt merge: error: {exc}", file=sys.stderr)
            return 2
    finally:
        if gc_was_enabled:
            gc.enable()
    print(f"merged model written to {out}")
    return 0


if __name__ == "__main__":
    code = main()
    # Skip the interpreter's teardown: with torch loaded it takes ~0.5 s (measured 2026-11-21) and there is nothing
    # left to do (the output is closed and renamed; log handlers and std streams are flushed here).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
