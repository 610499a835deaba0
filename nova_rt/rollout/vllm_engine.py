"""vLLM as a colocated rollout engine: one `vllm.LLM` inside each training process, weights synced every step.

At scale generation dominates a GRPO step, and vLLM brings a paged KV cache, continuous batching, prefix caching,
CUDA graphs and tensor-parallel inference; the HF loop stays the dependency-free default (nova_rt.rollout.engine).
This file is the only one that imports vllm.

The engine is built from the policy's config alone (load_format="dummy", token ids in, our tokenizer out): its
weights always come from the trainer, synced in buckets inside vLLM's layerwise reload before the first rollout after
each optimizer step, so a resumed run, a `tiny:` model or a merged model need no file vLLM can read (LoRA: the base
once, then the adapter alone, as a LoRARequest). Each sample is one request with its own seed (run seed, rank,
rollout call, sample index); EOS handling is the HF loop's. On CUDA (unrun so far) the engine sleeps between
rollouts; with TP > 1 it runs under vLLM's external_launcher; with parallel.backend=megatron each rank holds one
engine. Details: docs/rollout.md#the-vllm-engine. Legend: U prompts, G samples per prompt.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import typing
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from nova_rt.errors import UserError
from nova_rt.rollout.base import RolloutConfig, Sampling, check_generate_args, logprob_gap, policy_token_logprobs
from nova_rt.rollout.generate import Rollout

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def weight_buckets(named: Iterator[tuple[str, torch.Tensor]], bucket_mb: int) -> Iterator[list]:
    """Consecutive (name, tensor) lists of about bucket_mb MB each (a tensor larger than that is a bucket alone)."""
    limit, bucket, size = bucket_mb * 2**20, [], 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


class VLLMEngine:
    def __init__(self, cfg: RolloutConfig, model, tokenizer, sampling: Sampling, *,
                 policy_version: Callable[[], int], dtype: torch.dtype | None = None,
                 work_dir: str | os.PathLike | None = None):
        self.cfg, self.model, self.tok, self.sampling = cfg, model, tokenizer, sampling
        self.dtype = dtype or next(model.parameters()).dtype
        """The engine's dtype (model.dtype): fp32 master weights are cast to it on every sync."""
        self.policy_version = policy_version
        self.synced_version: int | None = None
        self.calls = 0
        self.metrics: dict[str, float] = {}
        self.eos = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self.cuda = next(model.parameters()).device.type == "cuda"
        self.tp_group, self.tp_rank, self.tp_size = _tp_group(cfg.tensor_parallel)
        self.seed = sampling.seed - self.tp_rank  # the TP group's first rank's seed (seeds are run seed + rank)
        self.lora = getattr(model, "peft_config", {}).get("default")
        """The trained adapter's peft LoraConfig (a LoRA policy), else None: then every sync sends all weights."""
        self.lora_request = None
        """The LoRARequest of the adapter synced last (LoRA policies), passed with every generate."""
        self.base_synced = False
        self.last_sync_bytes = 0
        """Bytes of tensors the last sync handed to vLLM (rollout_sync_mb sums them between pop_metrics)."""
        self._work_dir = work_dir
        self.llm = self._start()

    # ------------------------------------------------------------------------------------------- start-up
    def _start(self):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the LLM lives in this process
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # do not pin the trainer's cores
        if not self.cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cfg.kv_cache_gb))
        try:
            from vllm import LLM
        except ImportError as exc:
            raise UserError(f"grpo.rollout.engine: 'vllm' could not import vllm ({exc})") from None
        cfg, hf_cfg = self.cfg, self.model.config
        dtype = _DTYPES.get(self.dtype)
        if dtype is None:
            raise UserError(f"grpo.rollout.engine: 'vllm' cannot run a {self.dtype} model")
        self._dir = tempfile.TemporaryDirectory(prefix="nova_rt_vllm_")
        hf_cfg.save_pretrained(self._dir.name)
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(self._dir.name)
        max_len = cfg.max_model_len or min(4096, getattr(hf_cfg, "max_position_embeddings", 4096))
        kwargs = dict(model=self._dir.name, dtype=dtype, load_format="dummy", skip_tokenizer_init=True,
                  enforce_eager=not self.cuda, seed=self.seed, max_model_len=max_len, enable_prefix_caching=True,
                  logprobs_mode="processed_logprobs", tensor_parallel_size=cfg.tensor_parallel)
        if self.cuda:
            kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=cfg.sleep)
        if self.lora is not None:
            kwargs.update(enable_lora=True, max_lora_rank=_max_lora_rank(self.lora.r), max_loras=1, max_cpu_loras=1)
            self._adapters = tempfile.TemporaryDirectory(prefix=".vllm_adapter_", dir=self._work_dir or self._dir.name)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"
        try:
            with _quiet("vllm.renderers.base"):  # a chat-template warm-up that needs the tokenizer we skip
                return LLM(**kwargs)
        except Exception as exc:  # vLLM raises many kinds; the user needs the model and the first line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise UserError(f"grpo.rollout.engine: vLLM cannot load this model "
                            f"({getattr(hf_cfg, 'architectures', None)}, model_type={hf_cfg.model_type}): "
                            f"{type(exc).__name__}: {first}") from exc

    def vllm_model(self):
        """The torch module vLLM runs (in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
        return self.llm.llm_engine.model_executor.driver_worker.model_runner.model

    def _model_config(self):
        return self.llm.llm_engine.model_executor.driver_worker.model_runner.vllm_config.model_config

    # ------------------------------------------------------------------------------------------- weight sync
    @torch.no_grad()
    def sync_weights(self) -> float:
        """Trainer weights -> engine; returns the seconds it took (the bytes handed over: last_sync_bytes). All
        weights in buckets through load_weights, or for a LoRA policy the base (first sync only), then the adapter."""
        t0 = time.perf_counter()
        if self.cuda and self.cfg.sleep:
            self.llm.wake_up(tags=["weights"])
        nbytes = 0
        if self.lora is None:
            nbytes = self._load_weights(self.model.state_dict())
        else:
            from nova_rt.models.lora import base_state

            if not self.base_synced:
                nbytes = self._load_weights(base_state(self.model))
                self.base_synced = True
            nbytes += self._sync_adapter()
        if self.cuda and self.cfg.sleep:
            self.llm.wake_up(tags=["kv_cache"])
        self.llm.reset_prefix_cache()
        self.synced_version = self.policy_version()
        if self.cuda:
            torch.cuda.synchronize()
        self.last_sync_bytes = nbytes
        return time.perf_counter() - t0

    def _load_weights(self, state: dict) -> int:
        """`state` (HF names) into the vLLM model in buckets inside its layerwise reload; returns the bytes."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        module, nbytes = self.vllm_model(), 0
        with _quiet("vllm.model_executor.model_loader.reload.layerwise"):  # "RotaryEmbedding: Failed to load"
            initialize_layerwise_reload(module)  # (it has no weights: its kernel tensors are put back as they were)
            named = ((k, v.detach().to(self.dtype)) for k, v in state.items())  # fp32 masters: in model.dtype
            for bucket in weight_buckets(named, self.cfg.sync_bucket_mb):
                nbytes += sum(tensor.numel() * tensor.element_size() for _, tensor in bucket)
                module.load_weights(iter(bucket))
            finalize_layerwise_reload(module, self._model_config())
        return nbytes

    def _sync_adapter(self) -> int:
        """The trainer's adapter (A and B in the engine's dtype) -> a new adapter directory -> a new LoRARequest,
        loaded now; the previous one is removed from vLLM and disk. Returns the adapter's bytes."""
        from vllm.lora.request import LoRARequest

        from nova_rt.models.lora import save_engine_adapter

        previous = self.lora_request
        lora_id = previous.lora_int_id + 1 if previous is not None else 1
        directory = Path(self._adapters.name) / f"policy_{lora_id}"
        nbytes = save_engine_adapter(self.model, directory, self.dtype)
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        self.lora_request = LoRARequest(f"nova_rt_policy_{lora_id}", lora_id, str(directory))
        self.llm.llm_engine.add_lora(self.lora_request)  # loads it now: the sync's time includes it
        return nbytes

    def _ensure_synced(self) -> None:
        if self.synced_version != self.policy_version():
            seconds = self.sync_weights()
            self.metrics["rollout_sync_s"] = self.metrics.get("rollout_sync_s", 0.0) + seconds
            self.metrics["rollout_sync_mb"] = self.metrics.get("rollout_sync_mb", 0.0) + self.last_sync_bytes / 2**20

    # ------------------------------------------------------------------------------------------- sampling
    def _seed(self, call: int, i: int) -> int:
        return int(np.random.SeedSequence([self.seed, call, i]).generate_state(1)[0] & 0x7FFFFFFF)

    def _requests(self, prompts: list[list[int]], G: int, greedy: bool):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sampling, reqs, params = self.sampling, [], []
        for prompt_index, prompt in enumerate(prompts):
            for j in range(1 if greedy else G):
                reqs.append(TokensPrompt(prompt_token_ids=list(prompt)))
                params.append(SamplingParams(
                    max_tokens=sampling.max_new_tokens, temperature=0.0 if greedy else sampling.temperature,
                    top_p=1.0 if greedy else sampling.top_p, top_k=0 if greedy else sampling.top_k,
                    seed=None if greedy else self._seed(self.calls, prompt_index * G + j), logprobs=0, detokenize=False,
                    stop_token_ids=self.eos, ignore_eos=False))
        return reqs, params

    def _cut(self, toks: list[int], lps: list[float]) -> tuple[list[int], list[float], bool]:
        eos = set(self.eos)
        for j, token in enumerate(toks):
            if token in eos:
                return toks[:j + 1], lps[:j + 1], True
        return toks, lps, False

    def _run(self, prompts: list[list[int]], G: int, greedy: bool) -> tuple[list, list, list]:
        reqs, params = self._requests(prompts, G, greedy)
        outs = self.llm.generate(reqs, params, use_tqdm=False, lora_request=self.lora_request)
        self._count_prefix_cache(outs)
        toks, lps, fin = [], [], []
        for output in outs:
            completion = output.outputs[0]
            logprobs = [next(iter(top.values())).logprob if top else float("nan")
                        for top in (completion.logprobs or [])]
            tokens, logprobs, finished = self._cut(list(completion.token_ids), logprobs)
            for _ in range(G if greedy else 1):
                toks.append(tokens), lps.append(logprobs), fin.append(finished)
        return toks, lps, fin

    check_each_call = True
    """generate() re-scores grpo.rollout.logprob_check of its responses (the multi-turn stage turns it off and checks
    whole episodes once they end: one forward instead of one per turn)."""

    @property
    def max_new_tokens(self) -> int:
        """Most tokens one call samples per response (the multi-turn driver checks it against its per-turn limit)."""
        return self.sampling.max_new_tokens

    def _count_prefix_cache(self, outs) -> None:
        """rollout_prompt_tokens and rollout_prefix_cached_tokens (the prompt tokens whose KV vLLM's prefix cache
        already held: a group's shared prompt, or a multi-turn episode's earlier turns), summed since pop_metrics."""
        for name, count in (("rollout_prompt_tokens", sum(len(out.prompt_token_ids or ()) for out in outs)),
                            ("rollout_prefix_cached_tokens", sum(out.num_cached_tokens or 0 for out in outs))):
            self.metrics[name] = self.metrics.get(name, 0) + count

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], group_size: int = 1, *, greedy: bool = False) -> Rollout:
        """G responses per prompt (adjacent); greedy gives G copies of the argmax continuation (HF loop's rule)."""
        check_generate_args(prompts, group_size)
        t0, G = time.perf_counter(), group_size
        self._ensure_synced()
        mine = len(prompts)
        prompts_all, offset = _gather_prompts(prompts, self.tp_group, self.tp_rank, self.tp_size)
        toks, lps, fin = self._run(prompts_all, G, greedy)
        toks, lps, fin = (values[offset * G:(offset + mine) * G] for values in (toks, lps, fin))
        if not greedy:
            self.calls += 1
        if self.cuda and self.cfg.sleep:
            self.llm.sleep(level=2)
            self.synced_version, self.base_synced = None, False  # level 2 dropped the weights: sync them again
        rollout = Rollout(prompt_ids=[prompt for prompt in prompts for _ in range(G)], response_ids=toks,
                     texts=self.tok.batch_decode(toks, skip_special_tokens=True), finished=fin, logprobs=lps,
                     time_s=time.perf_counter() - t0)
        if not greedy and self.cfg.logprob_check and self.check_each_call:
            self._check(rollout)
        return rollout

    def _check(self, rollout: Rollout) -> None:
        """rollout_logprob_abs_diff(_max) over logprob_check responses spread evenly over the rollout (-1: all)."""
        t0, n, n_check = time.perf_counter(), len(rollout.response_ids), self.cfg.logprob_check
        idx = list(range(n)) if n_check < 0 or n_check >= n else [round(i * n / n_check) for i in range(n_check)]
        scorer = self.model.get_base_model() if self.lora is not None else self.model  # peft: the adapted HF model
        pol = policy_token_logprobs(scorer, [rollout.prompt_ids[i] for i in idx],
                                    [rollout.response_ids[i] for i in idx],
                                    temperature=self.sampling.temperature, batch_size=self.sampling.batch_size or 16,
                                    pad_id=self.pad_id)
        self.metrics.update(logprob_gap([rollout.logprobs[i] for i in idx], pol),
                            rollout_logprob_check_s=time.perf_counter() - t0)

    # ------------------------------------------------------------------------------------------- state
    def pop_metrics(self) -> dict:
        metrics, self.metrics = self.metrics, {}
        return metrics

    def close(self) -> None:
        """Shut the engine down while torch.distributed is still up (vLLM's own exit hook would tear down process
        groups that nova_rt.distributed.shutdown already destroyed, and print a traceback).

        vLLM's EngineCore.shutdown ends in cleanup_dist_env_and_memory -> destroy_distributed_environment, which
        calls torch.distributed.destroy_process_group() on the default group: the trainer's, with every group
        built on it (megatron's TP/DP groups), so a collective after close (megatron's save of the final model)
        would fail with "Default process group has not been initialized". The process group belongs to the
        trainer: here only vLLM's own groups are destroyed."""
        if self.llm is None:
            return
        from vllm.distributed import parallel_state as vps

        real = vps.destroy_distributed_environment

        def destroy_vllm_groups_only() -> None:
            if vps._WORLD is not None:
                vps._WORLD.destroy()
            vps._WORLD = vps._NODE_COUNT = None

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            vps.destroy_distributed_environment = destroy_vllm_groups_only
        try:
            self.llm.llm_engine.engine_core.shutdown()
        finally:
            vps.destroy_distributed_environment = real
            self.llm = None
            if self.lora is not None:
                self._adapters.cleanup()

    def state_dict(self) -> dict:
        return {"engine": "vllm", "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        if state.get("engine") != "vllm":
            raise UserError("grpo.rollout.engine: this checkpoint was written with another rollout engine "
                            "(its sampler state cannot seed vLLM); resume with the engine it was written with")
        self.calls = int(state["calls"])


@contextlib.contextmanager
def _quiet(name: str):
    """Raise the logger `name` to ERROR for the block (vLLM warnings that do not apply to this use)."""
    logger = logging.getLogger(name)
    drop = lambda record: record.levelno >= logging.ERROR  # noqa: E731 (a filter: vLLM may reset levels meanwhile)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _max_lora_rank(rank: int) -> int:
    """vLLM's max_lora_rank for an adapter of rank `rank`: the smallest value it allows that is >= rank."""
    from vllm.config.lora import MaxLoRARanks

    allowed = [value for value in typing.get_args(MaxLoRARanks) if value >= rank]
    if not allowed:
        raise UserError(f"lora.rank: {rank} is above the largest LoRA rank vLLM serves "
                        f"({max(typing.get_args(MaxLoRARanks))}); use a smaller lora.rank or grpo.rollout.engine=hf")
    return min(allowed)


def _eos_ids(model, tokenizer) -> list[int]:
    eos = set()
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos.update(gen_eos if isinstance(gen_eos, list) else ([gen_eos] if gen_eos is not None else []))
    if not eos:
        raise ValueError("the tokenizer has no eos_token_id")
    return sorted(eos)


def _tp_group(tp: int):
    """(group, rank in it, size) of this rank's rollout TP group: consecutive ranks; (None, 0, 1) when tp == 1."""
    if tp == 1:
        return None, 0, 1
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise UserError(f"grpo.rollout.tensor_parallel={tp} needs torchrun (external_launcher)")
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if world % tp:
        raise UserError(f"grpo.rollout.tensor_parallel={tp} must divide the world size {world}")
    group, _ = torch.distributed.new_subgroups_by_enumeration([list(range(i, i + tp)) for i in range(0, world, tp)])
    return group, rank % tp, tp


def _gather_prompts(prompts, group, rank: int, size: int) -> tuple[list[list[int]], int]:
    """All prompts of the TP group in rank order, and where this rank's start."""
    if group is None:
        return prompts, 0
    every: list = [None] * size
    torch.distributed.all_gather_object(every, prompts, group=group)
    return [prompt for part in every for prompt in part], sum(len(part) for part in every[:rank])
