"""Streaming `nova-rt merge`: per-tensor equality with the reference for every method on tiny Llamas (sharded
input and output), a merged model that loads and generates, tied embeddings, config / input errors, atomic output,
and bounded peak memory measured in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from nova_rt.merge import MergeConfigError, run_merge
from nova_rt.merge.cli import main as cli_main
from nova_rt.merge.methods import tensor_id
from nova_rt.merge.reference import (
    SPARSIFY_MAGNITUDE,
    SPARSIFY_NONE,
    SPARSIFY_RANDOM,
    GtaParams,
    gta_ref,
    model_stock_ref,
    slerp_ref,
    weighted_sum_ref,
)
from nova_rt.models.tiny import save_tiny_model
from tests.helpers import assert_close_verbose
from tests.merge.conftest import load_weights, make_finetune, write_yaml

GTA = {"task_arithmetic": (SPARSIFY_NONE, False, False), "ties": (SPARSIFY_MAGNITUDE, True, True),
       "dare_linear": (SPARSIFY_RANDOM, False, False), "dare_ties": (SPARSIFY_RANDOM, True, False)}
W = [0.6, 0.9, 0.3]
DENS = [0.5, 0.7, 0.3]


def _config(method: str) -> dict:
    """A mergekit-style config over the tiny models, with model paths relative to the YAML's directory."""
    fts = ["ft1", "ft2", "ft3"]
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": w}}
                                                     for m, w in zip(["base"] + fts, [0.4] + W)]}
    cfg: dict = {"merge_method": method, "base_model": "base", "dtype": "float32"}
    if method == "slerp":
        cfg.update(models=[{"model": "base"}, {"model": "ft1"}], parameters={"t": [{"filter": "mlp", "value": 0.2},
                                                                                 {"value": 0.6}]})
    elif method == "model_stock":
        cfg.update(models=[{"model": m} for m in fts], parameters={"filter_wise": False})
    else:
        with_density = GTA[method][0] != SPARSIFY_NONE
        cfg["models"] = [{"model": "base"}] + [
            {"model": m, "parameters": {"weight": w, **({"density": d} if with_density else {})}}
            for m, w, d in zip(fts, W, DENS)]
        cfg["parameters"] = {"lambda": 0.9, "normalize": True}
    return cfg


def _expected(method: str, name: str, ins: list[torch.Tensor], seed: int) -> torch.Tensor:
    if method == "linear":
        return weighted_sum_ref(ins, [0.4] + W, 1 / sum([0.4] + W), ins[0].dtype)
    base, xs = ins[0], ins[1:]
    if method == "slerp":
        return slerp_ref(base, xs[0], 0.2 if "mlp" in name else 0.6, base.dtype)
    if method == "model_stock":
        return model_stock_ref(base, xs, 0, base.dtype)
    sparsify, consensus, _ = GTA[method]
    p = GtaParams(weights=tuple(W), densities=tuple(DENS) if sparsify else (1.0,) * 3, sparsify=sparsify,
                  consensus=consensus, normalize=True, lam=0.9, rescale=sparsify == SPARSIFY_RANDOM, seed=seed,
                  tensor_id=tensor_id(name))
    return gta_ref(base, xs, p, base.dtype)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp",
                                    "model_stock"])
def test_merge_matches_reference_per_tensor(tiny_models, tmp_path, method):
    root = tiny_models["root"]
    cfg_path = write_yaml(root / f"{method}.yaml", _config(method))
    out = run_merge(cfg_path, tmp_path / "out", max_shard_size="100KB", progress=False, seed=7)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "expected a sharded output"
    merged = load_weights(out)
    inputs = {k: load_weights(tiny_models[k]) for k in ("base", "ft1", "ft2", "ft3")}
    order = ["base", "ft1"] if method == "slerp" else ["base", "ft1", "ft2", "ft3"]
    assert set(merged) == set(inputs["base"])
    for name, got in merged.items():
        want = _expected(method, name, [inputs[k][name] for k in order], 7)
        assert_close_verbose(got, want, rtol=1e-6, atol=1e-6, name=f"{method}:{name} (models seed "
                                                                     f"{tiny_models['seed']})")
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert (out / "nova_rt_merge.yaml").read_text() == cfg_path.read_text()


def test_merged_tiny_llama_loads_and_generates(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = {**_config("ties"), "out_dtype": "bfloat16"}
    cfg_path = write_yaml(tiny_models["root"] / "ties_bf16.yaml", cfg)
    out = run_merge(cfg_path, tmp_path / "merged", progress=False)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    ids = tok("hello merge", return_tensors="pt").input_ids
    # min_new_tokens: a random tiny model may put EOS first (seen once in CI: 1 new token)
    gen = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape == (1, ids.shape[1] + 6)
    merged = load_weights(out)
    sd = model.state_dict()
    assert torch.equal(sd["model.layers.0.mlp.up_proj.weight"], merged["model.layers.0.mlp.up_proj.weight"])


def test_tied_embeddings(tmp_path):
    untied = save_tiny_model(tmp_path / "untied", "qwen2", seed=3, tie=False)
    tied = save_tiny_model(tmp_path / "tied", "qwen2", seed=4, tie=True)
    a, b = load_weights(untied), load_weights(tied)
    assert "lm_head.weight" not in b
    cfg = {"merge_method": "linear", "models": [{"model": str(untied), "parameters": {"weight": 0.25}},
                                                 {"model": str(tied), "parameters": {"weight": 0.75}}]}
    out = load_weights(run_merge(cfg, tmp_path / "out_untied", progress=False))  # untied output: lm_head kept
    want = 0.25 * a["lm_head.weight"] + 0.75 * b["model.embed_tokens.weight"]
    assert_close_verbose(out["lm_head.weight"], want, rtol=1e-6, atol=1e-6, name="lm_head from tied embedding")
    cfg["models"].reverse()  # tied model first: the output config ties, so lm_head is dropped
    out_dir = run_merge(cfg, tmp_path / "out_tied", progress=False)
    assert "lm_head.weight" not in load_weights(out_dir)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("snippet, message", [
    ({"slices": []}, "'slices' is not supported"),
    ({"merge_method": "ties", "base_model": "base", "frobnicate": 1}, "unknown field 'frobnicate'"),
    ({"merge_method": "passthrough"}, "unknown merge_method 'passthrough'"),
    ({"parameters": {"gamma": 0.1}}, "unknown parameter 'gamma'"),
    ({"parameters": {"int8_mask": True}}, "int8_mask"),
    ({"parameters": {"rescale": True}}, "rescale"),
    ({"parameters": {"lambda": [0.1, 0.5, 1.0]}}, "gradients are not supported"),
    ({"parameters": {"lambda": "big"}}, "must be a number"),
    ({"models": [{"model": "base"}, {"model": "ft1", "parameters": {"weight": 1, "normalize": True}}]},
     "'normalize' is global"),
    ({"models": [{"model": "base"}, {"model": "ft1", "parameters": {"density": 0.5}}]}, "requires parameter 'weight'"),
    ({"models": [{"model": "nope", "parameters": {"weight": 1}}]}, "not a directory"),
    ({"tokenizer_source": "union"}, "union"),
    ({"tokenizer": {"source": "base"}}, "tokenizer surgery"),
    ({"merge_method": "linear", "models": [{"model": "ft1", "parameters": {"weight": 1}}]},
     "does not use a base model"),
    ({"merge_method": "slerp", "parameters": {"t": 0.5}, "models": [{"model": "ft1"}, {"model": "ft2"}]},
     "exactly 1 models besides the base"),
    ({"merge_method": "slerp", "models": [{"model": "ft1"}]}, "requires parameter 't'"),
    ({"merge_method": "model_stock", "parameters": {}, "models": [{"model": "ft1"}]}, "at least 2"),
    ({"models": [{"model": "ft1", "parameters": {"weight": 1}}, {"model": "./ft1", "parameters": {"weight": 1}}]},
     "same directory"),
    ({"dtype": "int4"}, "unsupported dtype"),
])
def test_config_errors_name_the_field(tiny_models, tmp_path, snippet, message):
    cfg = {"merge_method": "ties", "base_model": "base",
           "models": [{"model": "base"}, {"model": "ft1", "parameters": {"weight": 1.0, "density": 0.5}},
                      {"model": "ft2", "parameters": {"weight": 1.0, "density": 0.5}}], **snippet}
    with pytest.raises(MergeConfigError, match=message):
        run_merge(write_yaml(tiny_models["root"] / "bad.yaml", cfg), tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_mismatched_shapes_and_dtypes_name_tensor_and_models(tmp_path):
    a = save_tiny_model(tmp_path / "a", "llama", seed=1)
    save_tiny_model(tmp_path / "b", "llama", seed=2, intermediate=96)
    cfg = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}},
                                                 {"model": "b", "parameters": {"weight": 1}}]}
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight': shape \[64, 128\] in a but "
                                         r"\[64, 96\] in b"):
        run_merge(write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "out", progress=False)
    make_finetune(a, tmp_path / "c", seed=5, shared_seed=6, dtype=torch.bfloat16)
    cfg["models"][1]["model"] = "c"
    with pytest.raises(ValueError, match=r"dtype torch\.float32 in a but torch\.bfloat16 in c"):
        run_merge(write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "out", progress=False)
    cfg["dtype"] = "bfloat16"  # an explicit dtype casts every input, as mergekit does
    out = run_merge(write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "out", progress=False)
    assert all(t.dtype == torch.bfloat16 for t in load_weights(out).values())


def test_existing_output_needs_force_and_cli_exit_codes(tiny_models, tmp_path, capsys):
    cfg_path = write_yaml(tiny_models["root"] / "ta.yaml", _config("task_arithmetic"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert cli_main([str(cfg_path), str(out), "--no-progress"]) == 2
    assert "exists" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert cli_main([str(cfg_path), str(out), "--no-progress", "--force", "--max-shard-size", "2GB",
                    "--impl", "torch"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert cli_main([str(tiny_models["root"] / "missing.yaml"), str(tmp_path / "x"), "--no-progress"]) == 2


def test_failure_mid_merge_leaves_no_partial_output(tiny_models, tmp_path, monkeypatch):
    import nova_rt.merge.engine as engine

    real, calls = engine._merge_tensor, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_merge_tensor", flaky)
    cfg_path = write_yaml(tiny_models["root"] / "ta2.yaml", _config("task_arithmetic"))
    with pytest.raises(RuntimeError, match="injected failure"):
        run_merge(cfg_path, tmp_path / "out", max_shard_size="50KB", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "partial output left behind"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    calls.clear()
    with pytest.raises(RuntimeError, match="injected failure"):
        run_merge(cfg_path, tmp_path / "out", force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (tmp_path / "out" / "keep.txt").exists()


def _save_in_order(path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file with the tensors in this order (safetensors' save_file sorts them, which keeps every
    tensor aligned to its element size; this does not)."""
    header, blobs, offset = {}, [], 0
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.uint8: "U8"}
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def test_misaligned_tensors_and_truncated_files(tmp_path):
    """Tensors at offsets that are not a multiple of their element size (read by pread, written by copy) merge
    like aligned ones; a truncated input fails before merging, naming the file and the tensor."""
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    models = []
    for m in range(2):
        d = tmp_path / f"m{m}"
        d.mkdir()
        ts = {"mask": torch.randint(0, 255, (7,), generator=g, dtype=torch.uint8),  # odd size: misaligns the rest
              "w.bf16": torch.randn(5, 3, generator=g).bfloat16(), "w.f32": torch.randn(33, 65, generator=g)}
        _save_in_order(d / "model.safetensors", ts)
        (d / "config.json").write_text("{}")
        models.append(ts)
    cfg = {"merge_method": "linear", "models": [{"model": str(tmp_path / f"m{m}"), "parameters": {"weight": w}}
                                                 for m, w in ((0, 0.3), (1, 0.7))]}
    out = load_weights(run_merge(cfg, tmp_path / "out", progress=False))
    assert torch.equal(out["mask"], models[0]["mask"])
    for name in ("w.bf16", "w.f32"):
        want = weighted_sum_ref([models[0][name], models[1][name]], [0.3, 0.7], 1.0, models[0][name].dtype)
        assert_close_verbose(out[name], want, rtol=1e-6, atol=1e-6, name=f"{name} (seed {seed})")
    data = (tmp_path / "m1" / "model.safetensors").read_bytes()
    (tmp_path / "m1" / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"m1/model\.safetensors: tensor 'w\.f32' ends at byte \d+ but the file has"):
        run_merge(cfg, tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


_CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    from nova_rt.merge import run_merge
    from nova_rt.merge.ops import weighted_sum

    def high_water_kb():
        # VmHWM, not ru_maxrss: after exec, ru_maxrss starts at the forking parent's peak (the pytest process),
        # and only VmHWM can be reset (Linux >= 4.0) so that import-time transients do not mask the merge.
        try:
            status = dict(line.split(":", 1) for line in open("/proc/self/status"))
            return int(status["VmHWM"].split()[0])
        except (OSError, KeyError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    weighted_sum([torch.ones(4)], [1.0])  # load the extension (or the fallback) before the baseline
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = high_water_kb()
    run_merge(sys.argv[1], sys.argv[2], progress=False, max_shard_size="64MB")
    print(json.dumps({"baseline_kb": base, "peak_kb": high_water_kb()}))
""")


def test_peak_memory_is_bounded_by_tensors_not_model(tmp_path):
    """3 models of 64 x 2 MiB tensors (128 MiB each): the merge's extra RSS is a few tensors, not a model."""
    n_tensors, numel = 64, 512 * 1024
    for m in range(3):
        d = tmp_path / f"m{m}"
        d.mkdir()
        g = torch.Generator().manual_seed(m)
        for shard in range(2):
            names = range(shard * n_tensors // 2, (shard + 1) * n_tensors // 2)
            save_file({f"layers.{i}.weight": torch.randn(numel // 512, 512, generator=g) for i in names},
                      str(d / f"part{shard}.safetensors"))
        (d / "config.json").write_text("{}")
    cfg = {"merge_method": "ties", "base_model": str(tmp_path / "m0"),
           "models": [{"model": str(tmp_path / f"m{m}"), "parameters": {"weight": 0.5, "density": 0.5}}
                      for m in (1, 2)]}
    res = subprocess.run([sys.executable, "-c", _CHILD, str(write_yaml(tmp_path / "c.yaml", cfg)),
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    extra_mib = (stats["peak_kb"] - stats["baseline_kb"]) / 1024
    model_mib, tensor_mib = n_tensors * numel * 4 / 2**20, numel * 4 / 2**20
    # In flight: 3 mapped inputs + the output staging arena (2 tensors) = 5 tensors (10 MiB; measured 13.2 MiB).
    # The bound allows 10 tensors (20 MiB), i.e. ~1/6 of one model and ~1/19 of the bytes read.
    print(f"peak RSS added by the merge: {extra_mib:.1f} MiB (models {model_mib:.0f} MiB each)")
    assert extra_mib < 10 * tensor_mib, f"merge added {extra_mib:.1f} MiB RSS for {model_mib:.0f} MiB models"
    assert len(load_weights(tmp_path / "out")) == n_tensors
