"""`bench_merge.py --scale 7b|3b|1.5b|0.5b|tiny`: nova_rt vs mergekit on Qwen2.5-sized random checkpoints.

Writes a base and three "fine-tunes" (base + 0.002 x (shared + own noise)) with the exact tensor names and shapes of
that Qwen2.5 size, in HF's sharded layout (bf16, model-0000i-of-0000n.safetensors up to --shard-gb each, plus
model.safetensors.index.json); every tensor comes from torch.Generators seeded by (seed, name, role), generated in
chunks and written straight to the shard (one chunk in RAM, never a model). Merged with linear (3 models), TIES and
DARE-TIES (base + 3) and SLERP (base + 1). Every run (each tool, and a plain streaming copy of the same input files
to an output of the merged size, written through the page cache and with O_DIRECT: the I/O bound) starts with the
inputs evicted from the page cache (POSIX_FADV_DONTNEED on our own files: no root, no global drop_caches; the
resident fraction is measured with mincore and recorded) and runs in a child under a launcher that samples the
tree's summed RSS, RssAnon and RssAnon + RssShmem (nova_rt's input maps are file pages, its output arena shmem)
every 0.1 s (and ru_maxrss, exact for the largest process), its CPU seconds and its /proc/<pid>/io: read_bytes/
write_bytes (storage I/O) and rchar/wchar (syscalls: mmap reads are not in rchar). A tool past --rss-cap-gb (anon +
shmem) or --timeout is killed and recorded as such. Outputs are fsynced and evicted after each run (untimed),
compared tensor by tensor (bench_merge.compare's numbers, in row blocks), then removed.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

# Qwen2.5 sizes (config.json of Qwen/Qwen2.5-*); "tiny" runs the same code path in a test.
SCALES = {
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
ROLES = ("base", "ft1", "ft2", "ft3")
CHUNK = 1 << 23  # elements generated at a time (32 MiB of fp32 per stream)


def qwen_config(scale: str):
    from transformers import Qwen2Config

    return Qwen2Config(**SCALES[scale], architectures=["Qwen2ForCausalLM"], max_position_embeddings=32768,
                       rms_norm_eps=1e-6, rope_theta=1e6, use_sliding_window=False, dtype="bfloat16")


def qwen_shapes(scale: str, tensors: str | None = None) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes in HF's state_dict order (lm_head left out when tied, as save_pretrained does); only
    the names matching the regex `tensors` when given (e.g. a scale's largest tensors, which set the peak RSS)."""
    from transformers import AutoModelForCausalLM

    config = qwen_config(scale)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    if tensors is not None:
        shapes = {name: shape for name, shape in shapes.items() if re.search(tensors, name)}
        if not shapes:
            raise SystemExit(f"--tensors {tensors!r} matches no tensor of Qwen2.5-{scale}")
    return shapes


def shard_plan(shapes: dict[str, tuple[int, ...]], shard_bytes: int) -> list[list[str]]:
    """Names per shard, in order, each shard filled up to shard_bytes of bf16 (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _generator(seed: int, name: str, role: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{name}/{role}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def _header(names: list[str], shapes: dict[str, tuple[int, ...]]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        nbytes = 2 * _numel(shapes[name])
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_models(scale: str, root: Path, seed: int = 0, shard_bytes: int = 5 * 10**9,
                 tensors: str | None = None) -> list[Path]:
    """base, ft1, ft2, ft3 under root (regenerated unless a complete set with the same scale/seed/shards is there)."""
    stamp = {"scale": scale, "seed": seed, "shard_bytes": shard_bytes, "roles": list(ROLES)}
    if tensors is not None:
        stamp["tensors"] = tensors
    dirs = [root / role for role in ROLES]
    stamp_file = root / "generated.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    tmp = root.parent / f".{root.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shapes = qwen_shapes(scale, tensors)
    shards = shard_plan(shapes, shard_bytes)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for role in ROLES:
        (tmp / role).mkdir(parents=True)
    for fname, names in zip(files, shards):
        handles = [open(tmp / role / fname, "wb") for role in ROLES]
        try:
            header = _header(names, shapes)
            for handle in handles:
                handle.write(header)
            for name in names:
                _write_tensor(handles, seed, name, shapes[name])
            for handle in handles:  # clean pages, so that evict() can drop them before each run
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            for handle in handles:
                handle.close()
    weight_map = {name: fname for fname, names in zip(files, shards) for name in names}
    index = {"metadata": {"total_size": sum(2 * _numel(s) for s in shapes.values())}, "weight_map": weight_map}
    for role in ROLES:
        (tmp / role / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        qwen_config(scale).save_pretrained(tmp / role)
    (tmp / "generated.json").write_text(json.dumps(stamp))
    os.replace(tmp, root)
    return dirs


def _write_tensor(handles: list, seed: int, name: str, shape: tuple[int, ...]) -> None:
    """One tensor into every role's shard, CHUNK elements at a time: base ~ N(0, 0.02) (+1 for norm weights),
    ft_i = base + 0.002 (shared + own_i) (so task vectors agree in part, as TIES/DARE expect)."""
    generators = {role: _generator(seed, name, role) for role in ("base", "shared", *ROLES[1:])}
    offset = 1.0 if name.endswith("norm.weight") else 0.0
    remaining = _numel(shape)
    while remaining:
        count = min(CHUNK, remaining)
        remaining -= count
        base = torch.randn(count, generator=generators["base"]).mul_(0.02).add_(offset)
        shared = torch.randn(count, generator=generators["shared"])
        handles[0].write(base.to(torch.bfloat16).view(torch.int16).numpy())
        for handle, role in zip(handles[1:], ROLES[1:]):
            own = torch.randn(count, generator=generators[role]).add_(shared).mul_(0.002).add_(base)
            handle.write(own.to(torch.bfloat16).view(torch.int16).numpy())


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (ours only; no root needed; dirty pages are flushed first)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def cached_fraction(paths: list[Path]) -> float:
    """Fraction of these files' pages resident in the page cache (mincore over a private, never-written map)."""
    resident = total = 0
    for path in paths:
        size = path.stat().st_size
        if size == 0:
            continue
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY)
        pages = -(-size // mmap.PAGESIZE)
        vec = ctypes.create_string_buffer(pages)
        anchor = ctypes.c_char.from_buffer(mapped)
        try:
            if _libc.mincore(ctypes.addressof(anchor), size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
        finally:
            del anchor
            mapped.close()
        resident += int(torch.frombuffer(bytearray(vec.raw[:pages]), dtype=torch.uint8).bitwise_and(1).sum())
        total += pages
    return resident / total if total else 0.0


# Runs one command as a child and reports it: wall time; CPU seconds (user, sys) of the tree; the tree's summed RSS
# sampled every 0.1 s (children found through /proc/<pid>/task/<tid>/children); ru_maxrss of the largest process;
# the tree's I/O from the launcher's own /proc/self/io before and after wait4 (the kernel adds a reaped child's
# counters, and its reaped children's, to the parent's). Kills the tree past rss_cap bytes of RssAnon + RssShmem
# (mapped file pages are reclaimable page cache: they cannot run the machine out of memory) or timeout seconds.
# argv: rss_cap timeout cmd...
_LAUNCHER = r"""import json, os, signal, sys, time
cap, timeout, cmd = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
page = os.sysconf("SC_PAGE_SIZE")
def io():
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}
def tree(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out
def rss(pids):  # (resident, RssAnon, RssAnon + RssShmem) of the tree: what is left when file pages are not counted
    total = anon = shmem = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                fields = {k: v for k, _, v in (line.partition(":") for line in f)}
            anon += int(fields["RssAnon"].split()[0]) << 10
            shmem += int(fields["RssShmem"].split()[0]) << 10
            total += (int(fields["RssFile"].split()[0]) << 10) + (int(fields["RssAnon"].split()[0]) << 10) + (
                int(fields["RssShmem"].split()[0]) << 10)
        except (OSError, KeyError):
            pass
    return total, anon, anon + shmem
before = io()
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.setpgid(0, 0)
    os.execvp(cmd[0], cmd)
peak = anon_peak = unfiled_peak = 0
killed = None
while True:
    done, status, usage = os.wait4(pid, os.WNOHANG)
    if done:
        break
    now, anon, unfiled = rss(tree(pid))
    peak, anon_peak, unfiled_peak = max(peak, now), max(anon_peak, anon), max(unfiled_peak, unfiled)
    elapsed = time.perf_counter() - start
    if killed is None and (unfiled > cap or elapsed > timeout):
        killed = (f"tree anonymous + shmem RSS {unfiled / 2**30:.1f} GiB > cap" if unfiled > cap else
                  f"timeout after {elapsed:.0f} s")
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    time.sleep(0.1)
wall = time.perf_counter() - start
after = io()
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "wall_s": wall, "killed": killed,
                  "tree_rss_peak": max(peak, usage.ru_maxrss * 1024), "maxrss": usage.ru_maxrss * 1024,
                  "tree_anon_peak": anon_peak, "tree_anon_shmem_peak": unfiled_peak, "user_s": usage.ru_utime,
                  "sys_s": usage.ru_stime,
                  **{k: after[k] - before[k] for k in ("read_bytes", "write_bytes", "rchar", "wchar")}}))
"""


def measure(cmd: list[str], rss_cap: int = 1 << 62, timeout: float = 1e9) -> dict:
    """Run cmd under the launcher: wall_s, peak RSS of the tree, bytes read/written, load average at start/end."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    load_start = os.getloadavg()[0]
    res = subprocess.run([sys.executable, "-c", _LAUNCHER, str(rss_cap), str(timeout), *cmd], env=env,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"launcher failed ({res.returncode}): {res.stderr[-2000:]}")
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    stats.update(load1_start=round(load_start, 2), load1_end=round(os.getloadavg()[0], 2))
    if stats["rc"] != 0 and not stats["killed"]:
        stats["error"] = f"exit {stats['rc']}: " + " | ".join(res.stderr.strip().splitlines()[-3:])[-400:]
    elif stats["killed"]:
        stats["error"] = "killed: " + stats["killed"]
    return stats


# The I/O bound, as its own measured process without torch: read every source file start to end, then write
# out_bytes to dst (O_DIRECT or through the page cache; no fsync, like both tools). argv: sources.json out_bytes dst
# direct|buffered
_COPY = r"""import json, mmap, os, sys
sources, out_bytes, dst, direct = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "direct"
chunk = 64 << 20
buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
view = memoryview(buf)
for src in sources:
    with open(src, "rb", buffering=0) as handle:
        while handle.readinto(buf):
            pass
fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0), 0o644)
done = 0
while done < out_bytes:
    done += os.pwrite(fd, view[:min(chunk, -(-(out_bytes - done) // 4096) * 4096)], done)
os.ftruncate(fd, out_bytes)
os.close(fd)
"""

# (members besides the base, their parameters, global parameters, base used); SLERP merges the base and ft1.
METHODS = {
    "linear": (ROLES[1:], {"weight": 1.0}, None, False),
    "ties": (ROLES[1:], {"weight": 0.5, "density": 0.4}, None, True),
    "dare_ties": (ROLES[1:], {"weight": 0.5, "density": 0.5}, None, True),
    "slerp": (("base", "ft1"), None, {"t": 0.5}, True),
}


def write_config(method: str, root: Path, path: Path, dtype: str) -> tuple[Path, list[Path]]:
    """The YAML (same for both tools) and the model directories it reads."""
    members, member_params, params, with_base = METHODS[method]
    cfg: dict = {"merge_method": method, "dtype": dtype, "out_dtype": "bfloat16"}
    if with_base:
        cfg["base_model"] = str(root / "base")
    cfg["models"] = [{"model": str(root / role), **({"parameters": member_params} if member_params else {})}
                     for role in members]
    if params:
        cfg["parameters"] = params
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    dirs = sorted({root / role for role in members} | ({root / "base"} if with_base else set()))
    return path, dirs


def _settle(out: Path) -> int:
    """Untimed, after a run: fsync the output's files and evict them, so the next run starts from the same state.
    Returns the bytes of its *.safetensors / copy files."""
    files = [out] if out.is_file() else [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    evict(files)
    return sum(p.stat().st_size for p in files if p.suffix in (".safetensors", ".bin"))


def compare_sharded(ours: Path, theirs: Path, rows_per_block: int = 4096) -> dict:
    """bench_merge.compare's numbers (max |diff|, fraction of elements differing by more than 2^-8 of the larger
    magnitude) computed in row blocks, so a 7B embedding never sits in memory as fp32 whole."""
    from safetensors import safe_open

    def index(model_dir: Path) -> dict[str, Path]:
        out = {}
        for path in weight_files(model_dir):
            with safe_open(str(path), "pt") as handle:
                out.update({name: path for name in handle.keys()})
        return out

    a, b = index(ours), index(theirs)
    if set(a) != set(b):
        return {"max_abs_diff": float("nan"), "frac_gt_1ulp": float("nan"), "names_differ": sorted(set(a) ^ set(b))}
    worst, bad, total = 0.0, 0, 0
    for name in a:
        with safe_open(str(a[name]), "pt") as fa, safe_open(str(b[name]), "pt") as fb:
            sa, sb = fa.get_slice(name), fb.get_slice(name)
            rows = sa.get_shape()[0] if sa.get_shape() else 1
            for start in range(0, rows, rows_per_block):
                x = (sa[start:start + rows_per_block] if sa.get_shape() else sa[:]).float()
                y = (sb[start:start + rows_per_block] if sb.get_shape() else sb[:]).float()
                diff = (x - y).abs()
                worst = max(worst, diff.max().item() if diff.numel() else 0.0)
                bad += int((diff > torch.maximum(x.abs(), y.abs()) * 2**-8 + 1e-30).sum())
                total += x.numel()
    return {"max_abs_diff": worst, "frac_gt_1ulp": bad / max(total, 1)}


def bench_method(method: str, root: Path, work: Path, args, model_bytes: int) -> list[dict]:
    cfg, dirs = write_config(method, root, work / f"{method}.yaml", args.dtype)
    inputs = [path for model_dir in dirs for path in weight_files(model_dir)]
    in_bytes = sum(path.stat().st_size for path in inputs)
    cap, timeout = int(args.rss_cap_gb * 2**30), args.timeout
    outs = {"copy buffered": work / "copy.bin", "copy O_DIRECT": work / "copy.bin",
            "nova_rt": work / f"nova_{method}", "mergekit": work / f"mk_{method}"}
    commands = {
        "copy buffered": [sys.executable, "-c", _COPY, json.dumps(list(map(str, inputs))), str(model_bytes),
                          str(outs["copy buffered"]), "buffered"],
        "copy O_DIRECT": [sys.executable, "-c", _COPY, json.dumps(list(map(str, inputs))), str(model_bytes),
                          str(outs["copy O_DIRECT"]), "direct"],
        "nova_rt": [args.nova_python, "-m", "nova_rt.merge.cli", str(cfg), str(outs["nova_rt"]), "--no-progress",
                    "--max-shard-size", "5GB", "--random-seed", str(args.seed), *getattr(args, "nova_args", [])],
    }
    if not args.skip_mergekit:
        commands["mergekit"] = [args.mergekit, str(cfg), str(outs["mergekit"]), "--lazy-unpickle", "--quiet",
                                "--no-copy-tokenizer", "--no-write-model-card", "--out-shard-size",
                                args.mergekit_shard_size, "--random-seed", str(args.seed)]
    rows = []
    for tool, cmd in commands.items():
        out = outs[tool]
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        evict(inputs)
        cached = cached_fraction(inputs)
        stats = measure(cmd, cap, timeout)
        row = {"method": method, "tool": tool, "models_read": len(dirs), "in_bytes": in_bytes,
               "cached_frac_before": round(cached, 4), **stats, "out_bytes": _settle(out),
               "peak_rss_mb": stats["tree_rss_peak"] / 2**20, "peak_anon_mb": stats["tree_anon_peak"] / 2**20,
               "peak_anon_shmem_mb": stats["tree_anon_shmem_peak"] / 2**20}
        row["gb_per_s"] = (in_bytes + row["out_bytes"]) / stats["wall_s"] / 1e9
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("method", "tool", "wall_s", "peak_rss_mb", "read_bytes",
                                               "write_bytes", "load1_start")} | {"error": row.get("error")}),
              flush=True)
    (work / "copy.bin").unlink(missing_ok=True)
    by_tool = {row["tool"]: row for row in rows}
    bound = min(by_tool["copy buffered"]["wall_s"], by_tool["copy O_DIRECT"]["wall_s"])
    for row in rows:
        if row["tool"] in ("nova_rt", "mergekit") and "error" not in row:
            row["x_io_bound"] = row["wall_s"] / bound
    nova, mk = by_tool["nova_rt"], by_tool.get("mergekit")
    if mk is not None and "error" not in nova and "error" not in mk:
        nova.update(speedup_vs_mergekit=mk["wall_s"] / nova["wall_s"], rss_vs_mergekit=nova["peak_rss_mb"] /
                    mk["peak_rss_mb"], **compare_sharded(outs["nova_rt"], outs["mergekit"]))
    for tool in ("nova_rt", "mergekit"):
        shutil.rmtree(outs[tool], ignore_errors=True)
    return rows


def required_bytes(scale: str, tensors: str | None = None) -> tuple[int, int]:
    """(bytes of one model, free bytes the run needs: 4 inputs + 2 merged outputs + 1 copy + 2 GB slack)."""
    model = sum(2 * _numel(shape) for shape in qwen_shapes(scale, tensors).values())
    return model, 7 * model + 2 * 10**9


COLUMNS = ["method", "tool", "wall_s", "x_io_bound", "user_s", "sys_s", "peak_rss_mb", "peak_anon_mb",
           "peak_anon_shmem_mb", "read_bytes", "write_bytes", "rchar", "wchar", "cached_frac_before", "load1_start",
           "load1_end", "speedup_vs_mergekit", "rss_vs_mergekit", "max_abs_diff", "frac_gt_1ulp", "error"]


def save(rows: list[dict], meta: dict, json_path: Path) -> None:
    from benchmarks.common import environment, markdown_table

    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"benchmark": json_path.stem, "env": environment(), **meta, "rows": rows}, indent=2))
    os.replace(tmp, json_path)
    json_path.with_suffix(".md").unlink(missing_ok=True)
    print(markdown_table(rows, COLUMNS), flush=True)


def plot(rows: list[dict], meta: dict, png_path: Path) -> None:
    """Wall time (tools and the plain-copy bound) and peak RSS (total, anonymous part darker) per method; a run
    killed at the RSS cap or timeout is hatched and labelled (its bar is the time / memory until then)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(row["method"] for row in rows))
    series = ["I/O bound (plain copy)", "nova_rt", "mergekit"]
    fig, (ax_wall, ax_rss) = plt.subplots(1, 2, figsize=(11, 4.6))
    kind = "anon + shmem" if all("peak_anon_shmem_mb" in row for row in rows) else "anonymous"
    for position, method in enumerate(methods):
        by_tool = {row["tool"]: row for row in rows if row["method"] == method}
        copies = [by_tool[t]["wall_s"] for t in ("copy buffered", "copy O_DIRECT") if t in by_tool]
        for offset, label in enumerate(series):
            row = by_tool.get(label, {})
            value = min(copies) if offset == 0 and copies else row.get("wall_s", 0.0)
            x = position + (offset - 1) * 0.27
            ax_wall.bar(x, value, 0.27, color=f"C{offset}", hatch="//" if "error" in row else None,
                        label=label if position == 0 else None)
            if "error" in row:
                ax_wall.annotate("killed", (x, value), ha="center", va="bottom", fontsize=7)
        for offset, label in enumerate(series[1:]):
            row = by_tool.get(label, {})
            x = position + (offset - 0.5) * 0.35
            total = row.get("peak_rss_mb", 0.0) / 1024
            anon = row.get("peak_anon_shmem_mb", row.get("peak_anon_mb", 0.0)) / 1024
            ax_rss.bar(x, total, 0.35, color=f"C{offset + 1}", alpha=0.55, hatch="//" if "error" in row else None,
                       label=f"{label} (total)" if position == 0 else None)
            ax_rss.bar(x, anon, 0.35, color=f"C{offset + 1}", label=f"{label} ({kind})" if position == 0 else None)
            if "error" in row:
                ax_rss.annotate("killed", (x, total), ha="center", va="bottom", fontsize=7)
    for ax, ylabel in ((ax_wall, "wall time (s)"), (ax_rss, "peak RSS of the process tree (GiB)")):
        ax.set_xticks(range(len(methods)), methods)
        ax.set_ylabel(ylabel)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.3)  # room for the legend
        ax.legend(fontsize=7, ncols=2)
    ax_rss.axhline(4.0, color="grey", linestyle="--", linewidth=1)
    subset = f" (only the tensors matching {meta['tensors']!r})" if meta.get("tensors") else ""
    fig.suptitle(f"merge of Qwen2.5-{meta['scale']}-shaped bf16 models{subset} from a cold page cache\n"
                 f"{meta['machine']}; "
                 f"hatched: killed at the {kind} RSS cap or timeout (bar = until then)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def run(args) -> Path:
    """The --scale benchmark; returns the JSON path."""
    import datetime

    shard_bytes = int(args.shard_gb * 10**9)
    model_bytes, need = required_bytes(args.scale, args.tensors)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    root = work_dir / f"qwen2.5-{args.scale}{'-subset' if args.tensors else ''}"
    have = shutil.disk_usage(work_dir).free + (sum(p.stat().st_size for p in root.rglob("*.safetensors"))
                                                if root.exists() else 0)
    if have < need:
        sys.exit(f"--scale {args.scale}: needs {need / 1e9:.1f} GB free in {work_dir} (4 models of "
                 f"{model_bytes / 1e9:.2f} GB, 2 merged outputs, 1 copy, 2 GB slack) but only {have / 1e9:.1f} GB "
                 "is there; pick a smaller --scale or another --work-dir")
    stamp = f"{datetime.date.today():%Y%m%d}"
    json_path = Path(args.out) if args.out else REPO / "benchmarks" / "results" / \
        f"bench_merge_scale_{args.scale}_cpu_{stamp}.json"
    meta = {"scale": args.scale, "model_bytes": model_bytes, "disk_free_before": shutil.disk_usage(work_dir).free,
            "disk_needed": need, "seed": args.seed, "dtype": args.dtype, "omp_num_threads":
            os.environ.get("OMP_NUM_THREADS"), "machine": args.machine, "rss_cap_gb": args.rss_cap_gb,
            "timeout_s": args.timeout, "mergekit_shard_size": args.mergekit_shard_size, "tensors": args.tensors,
            "nova_args": getattr(args, "nova_args", [])}
    t0 = time.perf_counter()
    try:
        write_models(args.scale, root, args.seed, shard_bytes, args.tensors)
        meta["generate_s"] = time.perf_counter() - t0
        print(f"models ready in {meta['generate_s']:.0f} s under {root}", flush=True)
        work = work_dir / f"work_{args.scale}"
        work.mkdir(exist_ok=True)
        rows: list[dict] = []
        for method in args.methods.split(","):
            rows += bench_method(method, root, work, args, model_bytes)
            save(rows, meta, json_path)
            plot(rows, meta, json_path.with_suffix(".png"))
        shutil.rmtree(work, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return json_path


def add_arguments(parser) -> None:
    parser.add_argument("--scale", choices=list(SCALES), default=None,
                        help="Qwen2.5-shaped sharded models, cold cache, with an I/O bound (merge_scale.py)")
    parser.add_argument("--work-dir", default="/work/bench_merge_scale", help="--scale: where models are written")
    parser.add_argument("--keep", action="store_true", help="--scale: keep the generated models")
    parser.add_argument("--tensors", default=None,
                        help="--scale: only the tensors whose names match this regex, e.g. 'embed|lm_head|model.norm' "
                             "(the largest tensors set the peak RSS: a 7B peak check in ~9 GB of disk)")
    parser.add_argument("--seed", type=int, default=0, help="--scale: weights seed (and DARE's)")
    parser.add_argument("--shard-gb", type=float, default=5.0, help="--scale: input shard size (GB)")
    parser.add_argument("--rss-cap-gb", type=float, default=12.0,
                        help="--scale: kill a tool past this anonymous + shmem RSS of its process tree (GiB)")
    parser.add_argument("--mergekit-shard-size", default="1B",
                        help="--scale: mergekit's --out-shard-size (it buffers a whole output shard in memory: with "
                             "2500M its 3B linear merge passed 12 GiB of RSS)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="--scale: kill a tool after this many s")
    parser.add_argument("--nova-python", default=sys.executable, help="--scale: python that runs nova_rt")
    parser.add_argument("--mergekit", default=str(REPO / ".venv-bench" / "bin" / "mergekit-yaml"))
    parser.add_argument("--machine", default=f"{os.cpu_count()} shared CPU cores",
                        help="--scale: words for the plot title")
