"""`nova-rt merge` against mergekit on the same YAML and inputs: wall time, peak RSS, GB/s, and output agreement.

Inputs: a random Qwen2-shaped base model saved in bf16 plus two "fine-tunes" (base + shared + own noise), generated
once into --cache-dir. --size 0.5b is Qwen2-0.5B's shape (24 layers, hidden 896, vocab 151936, ~0.49B params,
~1 GB per model); --size small is a ~30M-parameter model for a quick run. Each tool runs as a child process
(`python -m nova_rt.merge.cli` / `mergekit-yaml`, HF_HUB_OFFLINE=1), forked by a small launcher that reports its
ru_maxrss (peak RSS) from os.wait4. With --reps N the tools alternate (nova_rt, mergekit, nova_rt, ...) so both see
the same load on a shared machine; wall_s is the fastest run, wall_all all of them, load1 the mean 1-minute load
average when the runs started, and output directories are removed before each run, outside the timing.
GB/s = (bytes of all input tensors read + bytes written) / wall time. Two "plain copy" rows bound the I/O: read every
input file and write one output of the merged size, through the page cache ("copy buffered") or with O_DIRECT
("copy O_DIRECT"); neither fsyncs (nor does either tool). A first pass warms the page cache, so every row reads from
memory. The YAML's dtype defaults to float32 (mergekit upcasts and computes in fp32;
nova_rt computes in fp32 from the bf16 inputs directly) with bf16 output. Outputs are compared tensor by tensor with
mergekit's: max |diff| and frac_gt_1ulp, the fraction of elements whose difference exceeds 2^-8 of their magnitude
(1 to 2 bf16 ulps). Model Stock differs most on the 136M-element embedding: mergekit's fp32 torch reductions give
cos 0.5137 where fp64 gives 0.49994 (nova_rt sums fp32 blocks in fp64: t = 0.666610, fp64 0.666610). With
--dtype bfloat16 mergekit rounds every intermediate to bf16 while nova_rt rounds once, so more elements differ by
an ulp; TIES may also keep a different element among equal magnitudes at the threshold (mergekit's argsort order
is unspecified).

    python benchmarks/bench_merge.py --size small [--methods linear,ties] [--reps 1] [--skip-mergekit]

--scale 7b|3b|1.5b|0.5b|tiny instead runs benchmarks/merge_scale.py: Qwen2.5-shaped sharded checkpoints, each run
from a cold page cache, with peak RSS of the process tree, bytes read/written and a plain-copy I/O bound.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import merge_scale  # noqa: E402
from benchmarks.common import report  # noqa: E402

SIZES = {
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=16384),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936),
}
METHODS = {
    "linear": {"parameters": None, "model": {"weight": 1.0}, "base": False},
    "task_arithmetic": {"parameters": {"lambda": 0.9}, "model": {"weight": 0.5}, "base": True},
    "ties": {"parameters": None, "model": {"weight": 0.5, "density": 0.4}, "base": True},
    "model_stock": {"parameters": None, "model": None, "base": True},
}
MERGEKIT = Path(sys.executable).parent / "mergekit-yaml"


def _config(size: str):
    from transformers import Qwen2Config

    return Qwen2Config(**SIZES[size], architectures=["Qwen2ForCausalLM"], max_position_embeddings=4096,
                       tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1e6, use_sliding_window=False,
                       dtype="bfloat16")


def _shapes(size: str) -> dict[str, tuple[int, ...]]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config(size))
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}


def build_models(size: str, cache: Path) -> list[Path]:
    """base, ft1, ft2 under cache/<size>/ (generated once; bf16 safetensors + config + byte tokenizer)."""
    from safetensors.torch import save_file

    from nova_rt.models.tiny import byte_tokenizer

    root = cache / size
    dirs = [root / n for n in ("base", "ft1", "ft2")]
    if all((d / "model.safetensors").is_file() for d in dirs):
        return dirs
    shapes = _shapes(size)
    for i, d in enumerate(dirs):
        d.mkdir(parents=True, exist_ok=True)
        g_base, g_shared, g_own = (torch.Generator().manual_seed(s) for s in (0, 1, 100 + i))
        tensors = {}
        for name, shape in shapes.items():
            t = torch.randn(shape, generator=g_base) * 0.02 + (1.0 if name.endswith("norm.weight") else 0.0)
            if i > 0:
                t += 0.002 * (torch.randn(shape, generator=g_shared) + torch.randn(shape, generator=g_own))
            tensors[name] = t.to(torch.bfloat16)
        save_file(tensors, str(d / "model.safetensors.tmp"), metadata={"format": "pt"})
        os.replace(d / "model.safetensors.tmp", d / "model.safetensors")
        _config(size).save_pretrained(d)
        byte_tokenizer().save_pretrained(d)
        del tensors
    return dirs


def write_yaml(method: str, dirs: list[Path], path: Path, dtype: str) -> Path:
    spec = METHODS[method]
    cfg = {"merge_method": method, "dtype": dtype, "out_dtype": "bfloat16"}
    if spec["base"]:
        cfg["base_model"] = str(dirs[0])
    members = dirs[1:] if spec["base"] else dirs
    cfg["models"] = [{"model": str(d), **({"parameters": spec["model"]} if spec["model"] else {})} for d in members]
    if spec["parameters"]:
        cfg["parameters"] = spec["parameters"]
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# A small Python forks the tool and reports its rusage: a process exec'd straight from this (large) benchmark
# process would start with this process's peak RSS in ru_maxrss (Linux carries the pre-exec peak over).
_LAUNCHER = """import json, os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss}), file=sys.stderr)
"""


def run_child(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, peak RSS MiB, 1-minute load average at the start) of one child process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    load1 = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    stats = json.loads(res.stderr.strip().splitlines()[-1])
    if stats["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({stats['rc']}):\n{res.stderr[-3000:]}")
    return wall, stats["maxrss_kb"] / 1024, load1


def plain_copy(dirs: list[Path], out_bytes: int, dst: Path, direct: bool) -> float:
    """Read every input file, write out_bytes to one file (page cache or O_DIRECT, no fsync). Returns seconds."""
    import mmap

    chunk = 64 << 20
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    view = memoryview(buf)
    dst.unlink(missing_ok=True)
    t0 = time.perf_counter()
    for d in dirs:
        with open(d / "model.safetensors", "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(dst, flags, 0o644)
    with open(dirs[0] / "model.safetensors", "rb", buffering=0) as src:
        done = 0
        while done < out_bytes:
            n = src.readinto(view)
            n = -(-n // 4096) * 4096 if direct else n  # O_DIRECT writes whole blocks
            done += os.pwrite(fd, view[:n], done)
    os.ftruncate(fd, out_bytes)
    os.close(fd)
    wall = time.perf_counter() - t0
    view.release()
    buf.close()
    return wall


def compare(ours: Path, theirs: Path) -> dict:
    """Max |diff|, and the fraction of elements differing by more than 1 bf16 ulp of the larger magnitude."""
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    def get(f: Path, name: str) -> torch.Tensor:
        with safe_open(str(f), "pt") as h:
            return h.get_tensor(name).float()

    a, b = index(ours), index(theirs)
    if set(a) != set(b):
        return {"max_abs_diff": float("nan"), "frac_gt_1ulp": float("nan"), "names_differ": sorted(set(a) ^ set(b))}
    worst, bad, total = 0.0, 0, 0
    for name in a:
        x, y = get(a[name], name), get(b[name], name)
        d = (x - y).abs()
        worst = max(worst, d.max().item())
        bad += int((d > torch.maximum(x.abs(), y.abs()) * 2**-8 + 1e-30).sum())
        total += x.numel()
    return {"max_abs_diff": worst, "frac_gt_1ulp": bad / max(total, 1)}


def bench_method(method: str, dirs: list[Path], work: Path, args) -> list[dict]:
    cfg = write_yaml(method, dirs, work / f"{method}.yaml", args.dtype)
    in_bytes = sum((d / "model.safetensors").stat().st_size for d in dirs)  # every config reads all three
    tools = {"nova_rt": ([sys.executable, "-m", "nova_rt.merge.cli", str(cfg), str(work / f"nova_{method}"),
                          "--no-progress", *args.nova_args], work / f"nova_{method}")}
    if not args.skip_mergekit:
        tools["mergekit"] = ([str(MERGEKIT), str(cfg), str(work / f"mk_{method}"), "--quiet", "--no-copy-tokenizer",
                              "--no-write-model-card"], work / f"mk_{method}")
    runs: dict[str, list] = {t: [] for t in tools}
    errors: dict[str, str] = {}
    for _ in range(args.reps):  # alternate the tools, so that both see the same load
        for tool, (cmd, out_dir) in tools.items():
            if tool in errors:
                continue
            shutil.rmtree(out_dir, ignore_errors=True)
            try:
                runs[tool].append(run_child(cmd))
            except RuntimeError as exc:  # e.g. killed for memory on a shared machine: record it, keep going
                errors[tool] = str(exc).splitlines()[0][-200:]
                print(f"{method}/{tool} failed: {exc}", flush=True)
    rows = []
    for tool, (_, out_dir) in tools.items():
        if tool in errors:
            rows.append({"method": method, "tool": tool, "error": errors[tool]})
            continue
        walls = [r[0] for r in runs[tool]]
        out_bytes = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
        rows.append({"method": method, "tool": tool, "wall_s": min(walls), "wall_all": [round(w, 2) for w in walls],
                     "peak_rss_mb": max(r[1] for r in runs[tool]),
                     "load1": round(sum(r[2] for r in runs[tool]) / len(walls), 2),
                     "gb_per_s": (in_bytes + out_bytes) / min(walls) / 1e9})
        print(json.dumps(rows[-1]), flush=True)
    if len(rows) == 2 and all("error" not in r for r in rows):
        nova, mk = rows
        nova.update(speedup=mk["wall_s"] / nova["wall_s"], rss_ratio=nova["peak_rss_mb"] / mk["peak_rss_mb"],
                    **compare(work / f"nova_{method}", work / f"mk_{method}"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--methods", default=None, help=f"default: {','.join(METHODS)} (--scale: linear,ties,dare_ties,"
                    "slerp)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--cache-dir", default=os.environ.get("NOVA_RT_BENCH_CACHE", "/tmp/nova_rt_bench_merge"))
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the YAML's `dtype` (mergekit computes in it; nova_rt always accumulates in fp32); output "
                         "is bfloat16 either way")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/...)")
    ap.add_argument("--nova-args", type=shlex.split, default=[],
                    help="extra `nova-rt merge` flags, e.g. '--block-mb 0' (every tensor whole) or '--threads 2'")
    merge_scale.add_arguments(ap)
    args = ap.parse_args()
    if args.scale is not None:
        args.methods = args.methods or ",".join(merge_scale.METHODS)
        merge_scale.run(args)
        return
    args.methods = args.methods or ",".join(METHODS)
    cache = Path(args.cache_dir)
    dirs = build_models(args.size, cache)
    work = cache / f"work_{args.size}"
    work.mkdir(parents=True, exist_ok=True)
    model_bytes = (dirs[0] / "model.safetensors").stat().st_size
    plain_copy(dirs, model_bytes, work / "copy.bin", direct=False)  # warm the page cache
    rows = []
    for direct in (False, True):
        copy_s = min(plain_copy(dirs, model_bytes, work / "copy.bin", direct) for _ in range(max(1, args.reps)))
        rows.append({"method": "-", "tool": "copy O_DIRECT" if direct else "copy buffered", "wall_s": copy_s,
                     "gb_per_s": 4 * model_bytes / copy_s / 1e9, "load1": round(os.getloadavg()[0], 2)})
    (work / "copy.bin").unlink(missing_ok=True)
    for method in args.methods.split(","):
        rows += bench_method(method, dirs, work, args)
    for r in rows:
        r["size"] = args.size
        r["dtype"] = args.dtype
        r["model_gb"] = model_bytes / 1e9
    cols = ["size", "dtype", "method", "tool", "wall_s", "wall_all", "load1", "peak_rss_mb", "gb_per_s", "speedup",
            "rss_ratio", "max_abs_diff", "frac_gt_1ulp", "error"]
    report(f"merge_{args.size}", rows, cols, out=args.out)
    print(json.dumps({r["tool"]: round(r["gb_per_s"], 3) for r in rows if r["method"] == "-"}))


if __name__ == "__main__":
    main()
