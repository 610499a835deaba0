"""`nova-rt augment --model DIR "prompt" ...`: print each prompt followed by its PAS complement.

Prompts come from the arguments, from `--file` (a jsonl with a `prompt` field, or plain text with one prompt per
line), or from stdin with `-`. `--json` prints one JSON object per prompt: {prompt, complement, augmented}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nova-rt augment", description="Append PAS complements to prompts.")
    p.add_argument("prompts", nargs="*", help="prompts to augment ('-' reads one prompt per line from stdin)")
    p.add_argument("--model", required=True, help="trained PAS model directory (e.g. RUN_DIR/pas_model/final)")
    p.add_argument("--file", help="jsonl with a 'prompt' field, or a text file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--separator", default="\n\n", help="text between the prompt and its complement")
    p.add_argument("--json", action="store_true", help="print JSON lines {prompt, complement, augmented}")
    return p


def _read_file(path: str) -> list[str]:
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".jsonl"):
        out = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise ValueError(f"{path}:{lineno}: expected an object with a string 'prompt'")
                out.append(row["prompt"])
        return out
    return [line for line in text.splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    prompts = []
    for p in args.prompts:
        prompts.extend([line for line in sys.stdin.read().splitlines() if line.strip()] if p == "-" else [p])
    try:
        if args.file:
            prompts.extend(_read_file(args.file))
        if not prompts:
            print("nova-rt augment: no prompts given (pass them as arguments, --file, or '-')", file=sys.stderr)
            return 2
        if not Path(args.model).is_dir():
            print(f"nova-rt augment: --model {args.model!r} is not a directory", file=sys.stderr)
            return 2
        from nova_rt.pas.augment import PromptAugmenter

        aug = PromptAugmenter(args.model, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                              separator=args.separator)
        comps = aug.complements(prompts)
    except (OSError, ValueError) as exc:
        print(f"nova-rt augment: {exc}", file=sys.stderr)
        return 1
    for p, c in zip(prompts, comps):
        full = p + args.separator + c if c else p
        print(json.dumps({"prompt": p, "complement": c, "augmented": full}, ensure_ascii=False) if args.json
              else full + ("\n" + "-" * 40 if len(prompts) > 1 else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
