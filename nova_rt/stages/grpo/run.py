"""The GRPO stage's loop (GRPORun): rollouts, rewards, dynamic sampling, micro-batches with reference / old
log-probs, optimizer steps, per-category eval and re-weighting, checkpoints and exact resume (see the package
docstring, nova_rt.stages.grpo, for one step in full)."""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import torch

from nova_rt.backends import get_backend
from nova_rt.config import Config
from nova_rt.data.chat import IGNORE, Sample
from nova_rt.data.packing import collate, epoch_permutation, make_row
from nova_rt.data.rl import (
    CategorySampler,
    PromptEncoder,
    build_prompt_sets,
    evaluate_categories,
    normalise_weights,
    reweight,
)
from nova_rt.losses.kl import sampled_kl, topk_kl
from nova_rt.models.attention import SharedPrefixLayout
from nova_rt.stages import register_stage
from nova_rt.stages.common import data_files, setup
from nova_rt.stages.grpo.batches import agg_scale_and_weights, agg_totals, pack_responses
from nova_rt.stages.grpo.losses import make_objective
from nova_rt.telemetry import Telemetry

log = logging.getLogger("nova_rt.grpo")


class GRPORun:
    """State of one GRPO run: policy + trainer, reference, rollout generator, rewards, prompt sampler, PTX data."""

    shared_prefix = False
    """Whether micro_batches use the shared-prefix layout (set in __init__ from grpo.shared_prefix and the model)."""
    dp_group = None
    """Process group of the data-parallel ranks for token totals (None: all ranks; the megatron backend's DP group)."""

    def __init__(self, cfg: Config):
        from nova_rt.rewards import build_reward
        from nova_rt.rollout.engine import Sampling, build_rollout_engine

        self.cfg, self.g = cfg, cfg.grpo
        self.info, self.run_dir = setup(cfg)
        if self.info.distributed and cfg.parallel.data_parallel == "fsdp2":
            raise ValueError("grpo generates on every rank independently; use parallel.data_parallel=ddp")
        g, world = self.g, self.info.world_size
        if g.sampling.prompts_per_step % world or cfg.train.max_steps % g.steps_per_rollout:
            raise ValueError(f"grpo.sampling.prompts_per_step={g.sampling.prompts_per_step} must divide by "
                             f"world_size={world}, and train.max_steps={cfg.train.max_steps} by ppo_epochs x "
                             f"minibatches={g.steps_per_rollout}")
        # the trained policy (a PolicyBackend, nova_rt.backends) and the HF model rollouts generate with
        self.trainer, self.tok = get_backend(cfg.parallel.backend).build(cfg, self.info, self.run_dir, head="policy")
        self.hf = self.trainer.hf_model
        self.trainer.step_options = {"temperature": g.sampling.temperature, "entropy": True, "topk_ids": "ref_topk_ids"}
        tr = self.trainer  # the data-parallel view (on megatron: its DP group)
        self.dp_rank, self.dp_size, self.dp_sum, self.dp_group = tr.dp_rank, tr.dp_size, tr.dp_sum, tr.dp_group
        self.ref = tr.reference(g.ref_model or None) if g.needs_ref else None
        self.shared_prefix = (g.shared_prefix and tr.supports_shared_prefix
                              and (self.ref is None or self.ref.supports_shared_prefix))
        s = g.sampling
        self.generator = build_rollout_engine(
            g.rollout, self.hf, self.tok,
            Sampling(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                     seed=cfg.run.seed * 1000 + self.info.rank, batch_size=s.rollout_batch),
            policy_version=lambda: self.trainer.step, backend=cfg.parallel.backend)
        self.reward = build_reward(g.rewards, base_dir=cfg.config_dir)
        self._load_prompts()
        self.ptx = self._load_ptx() if g.ptx.coef > 0 else None
        self.prompt_ids = PromptEncoder(self.tok, g.data.pas_model)
        self.loss_fn = make_objective(g)

    def _load_prompts(self) -> None:
        d, cfg = self.g.data, self.cfg
        pools, self.eval_pools, base = build_prompt_sets(data_files(cfg, d.prompt_files), data_files(cfg, d.eval_files),
                                                         d.gym_tasks, d.system_prompt, cfg.data.on_error, self.tok)
        self.base_weights = normalise_weights({**base, **d.category_weights}, sorted(pools))
        self.sampler = CategorySampler(pools, self.base_weights, seed=cfg.run.seed)
        if self.info.is_main:
            log.info("RL prompts per category: %s; eval: %s", {c: len(p) for c, p in pools.items()},
                     {c: len(p) for c, p in self.eval_pools.items()})

    def _load_ptx(self) -> list[Sample]:
        from nova_rt.data.sft import load_sft_samples

        samples, _ = load_sft_samples(data_files(self.cfg, self.g.ptx.files), self.tok,
                                      max_seq_len=self.g.ptx.max_len, system_prompt=self.cfg.data.system_prompt)
        if len(samples) < self.g.ptx.batch or self.g.ptx.batch % self.dp_size:
            raise ValueError(f"grpo.ptx.batch={self.g.ptx.batch} must be <= the {len(samples)} PTX samples and "
                             f"divide by the data-parallel size {self.dp_size}")
        return samples

    def score(self, texts: list[str], samples: list[dict]) -> tuple[list[float], dict, list[float] | None]:
        total, per = self.reward(texts, samples)
        return total, per, self.reward.correctness(per)

    # ------------------------------------------------------------------------------------------- rollouts
    def collect(self) -> tuple[list[dict], dict]:
        """This rank's groups for one step ({prompt, responses, rewards}) and global rollout metrics, generated
        with the policy's current weights once per data-parallel replica."""
        self.trainer.sync_generation_model()
        return self.trainer.once_per_replica(self._collect)

    def _collect(self) -> tuple[list[dict], dict]:
        g, rank, world = self.g, self.dp_rank, self.dp_size
        per_rank, G = g.sampling.prompts_per_step // world, g.sampling.group_size
        kept, dropped, sums = [], [], torch.zeros(7, dtype=torch.float64)
        for _ in range(1 + (g.sampling.dynamic_max_rounds if g.sampling.dynamic_sampling else 0)):
            mine = self.sampler.draw(g.sampling.prompts_per_step)[rank * per_rank:(rank + 1) * per_rank]
            ro = self.generator.generate(self.prompt_ids(mine), G)
            total, _, correct = self.score(ro.texts, [s for s in mine for _ in range(G)])
            lens = [len(r) for r in ro.response_ids]
            sums += torch.tensor([len(total), sum(total), sum(x * x for x in total),
                                  sum(correct) if correct is not None else 0.0, sum(lens),
                                  len(lens) - sum(ro.finished), 0.0], dtype=torch.float64)
            for j in range(len(mine)):
                grp = {"prompt": ro.prompt_ids[j * G], "responses": ro.response_ids[j * G:(j + 1) * G],
                       "rewards": total[j * G:(j + 1) * G], "rollout_lp": ro.logprobs[j * G:(j + 1) * G]}
                same = max(grp["rewards"]) - min(grp["rewards"]) <= 1e-9
                sums[6] += float(same)
                (dropped if g.sampling.dynamic_sampling and same else kept).append(grp)
            kept = kept[:per_rank]
            if not g.sampling.dynamic_sampling:
                break
            n = self.dp_sum(torch.tensor([float(len(kept))], dtype=torch.float64))
            if n.item() >= g.sampling.prompts_per_step:
                break
        if len(kept) < g.minibatches:  # every rank must take part in every optimizer step
            kept += dropped[:g.minibatches - len(kept)]
        n_kept = self.dp_sum(torch.tensor([float(len(kept))], dtype=torch.float64)).item()
        self.dp_sum(sums)
        n, mean = sums[0].item(), sums[1].item() / sums[0].item()
        metrics = {"reward_mean": mean, "reward_std": max(sums[2].item() / n - mean * mean, 0.0) ** 0.5,
                   "response_len": sums[4].item() / n, "truncated_frac": sums[5].item() / n,
                   "equal_reward_group_frac": sums[6].item() / (n / G), "groups_trained": n_kept}
        if self.reward.verifiable:
            metrics["accuracy"] = sums[3].item() / n
        return kept, metrics

    # ------------------------------------------------------------------------------------------- micro-batches
    def _to_dev(self, mb: dict) -> dict:
        return {k: v.to(self.info.device) if isinstance(v, (torch.Tensor, SharedPrefixLayout)) else v
                for k, v in mb.items()}

    def _ref_topk(self, mb: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's top-k ids and log-probs at the target tokens."""
        return self.ref.forward([mb], _topk, temperature=temperature, topk=self.g.loss.topk, autocast=True)[0]

    @torch.no_grad()
    def precompute(self, mb: dict) -> dict:
        """Reference top-k ids / log-probs (or sampled-token log-probs) and, for reused batches, old log-probs (at
        the reference's top-k ids too, for the top-k KL in the reward)."""
        g, T = self.g, self.g.sampling.temperature
        mb = self._to_dev(mb)
        if self.ref is not None and g.loss.beta > 0:
            if g.loss.kl == "topk":
                mb["ref_topk_ids"], mb["ref_topk_lp"] = self._ref_topk(mb, T)
            else:
                mb["ref_lp"] = self.ref.forward([mb], _outputs, temperature=T, autocast=True)[0]["logprobs"]
        if g.steps_per_rollout > 1:
            out = self.trainer.forward([mb], _outputs, temperature=T, topk_ids="ref_topk_ids", autocast=True)[0]
            mb["old_lp"] = out["logprobs"]
            if g.loss.beta > 0 and g.loss.kl_placement == "reward":
                mb["old_kl"] = topk_kl(out["topk_logprobs"], mb["ref_topk_lp"]) if g.loss.kl == "topk" \
                    else sampled_kl(out["logprobs"], mb["ref_lp"], g.loss.kl)
        return mb

    def micro_batches(self, groups: list[dict]) -> list[dict]:
        g = self.g
        totals = agg_totals([len(r) for grp in groups for r in grp["responses"]], self.dp_group)
        if g.loss.agg == "seq-mean-token-sum-norm" and g.loss.sum_norm_len > 0:
            totals[3] = float(g.loss.sum_norm_len)  # a constant L instead of the longest response
        step = g.micro_prompts or max(len(groups), 1)
        mbs = []
        for i in range(0, len(groups), step):
            part = groups[i:i + step]
            responses = [r for grp in part for r in grp["responses"]]
            mb = pack_responses([grp["prompt"] for grp in part for _ in grp["responses"]], responses,
                                shared_prefix=self.shared_prefix)
            scale, tok_w = agg_scale_and_weights(g.loss.agg, [len(r) for r in responses], totals)
            mb.update(kind="rl", agg_scale=scale, tok_w=tok_w,
                      rewards=torch.tensor([x for grp in part for x in grp["rewards"]], dtype=torch.float32))
            if g.rollout.tis_cap > 0:  # the engine's sampling log-probs, flat in the order of the response tokens
                mb["rollout_lp"] = torch.tensor([x for grp in part for lps in grp["rollout_lp"] for x in lps],
                                                dtype=torch.float32)
            mbs.append(self.precompute(mb))
        return mbs

    @torch.no_grad()
    def ptx_micro_batches(self, r: int) -> list[dict]:
        """This data-parallel rank's share of the PTX rows of rollout step r (a pure function of r: resumable)."""
        n, B, world, rank = len(self.ptx), self.g.ptx.batch, self.dp_size, self.dp_rank
        idx = []
        for j in range(r * B, (r + 1) * B):
            epoch, pos = divmod(j, n)
            idx.append(int(epoch_permutation(n, self.cfg.run.seed + 17, epoch)[pos]))
        rows = [self.ptx[i] for i in idx]
        total = sum(s.n_supervised for s in rows)
        per = B // world
        mb = self._to_dev(collate([make_row(rows[rank * per:(rank + 1) * per])]))
        n_sup = int((mb["targets"] != IGNORE).sum())
        # PTX rows: temperature 1 and no entropy (RL rows: grpo.sampling.temperature)
        mb.update(kind="ptx", w=torch.full((n_sup,), 1.0 / max(total, 1), device=self.info.device), temperature=1.0,
                  entropy=False)
        mb["ref_topk_ids"], mb["ref_topk_lp"] = self._ref_topk(mb, 1.0)
        return [mb]

    # ------------------------------------------------------------------------------------------- training
    def train_on(self, groups: list[dict], r: int) -> dict:
        """ppo_epochs x minibatches optimizer steps on one rollout batch; metrics averaged over them."""
        g = self.g
        parts = [[groups[i] for i in idx] for idx in np.array_split(np.arange(len(groups)), g.minibatches)]
        mb_parts = [self.micro_batches(p) for p in parts]
        ptx = self.ptx_micro_batches(r) if self.ptx is not None else []
        sums: dict[str, float] = {}
        for _ in range(g.ppo_epochs):
            for mbs in mb_parts:
                st = self.trainer.train_step(mbs + ptx, self.loss_fn)
                for k, v in st.items():
                    sums[k] = sums.get(k, 0.0) + v
        steps, tok = g.steps_per_rollout, max(sums["resp_tokens"], 1.0)
        out = {"loss": sums["loss"] / steps, "grad_norm": sums["grad_norm"] / steps, "lr": st["lr"],
               "clip_frac": sums["clip_tokens"] / tok,
               "entropy": sums["entropy_sum"] / tok, "ratio_mean": sums["ratio_sum"] / tok}
        if "kl_sum" in sums:
            out["kl"] = sums["kl_sum"] / tok
        if "tis_w_sum" in sums:  # grpo.rollout.tis_cap: mean TIS weight over response tokens
            out["tis_weight_mean"] = sums["tis_w_sum"] / tok
        if "ptx_kl_sum" in sums:
            out["ptx_kl"] = sums["ptx_kl_sum"] / max(sums["ptx_tokens"], 1.0)
        if "nonfinite_skipped" in st:  # a running total (kept across resumes), not a per-step value
            out["nonfinite_skipped"] = st["nonfinite_skipped"]
        return out

    # ------------------------------------------------------------------------------------------- eval
    def evaluate(self) -> dict[str, dict[str, float]]:
        """Greedy per-category eval over all data-parallel replicas (each takes every dp_size-th prompt)."""
        self.trainer.sync_generation_model()
        return self.trainer.once_per_replica(self._evaluate)

    def _evaluate(self) -> dict[str, dict[str, float]]:
        def score(texts, samples):
            total, _, correct = self.score(texts, samples)
            return total, correct

        return evaluate_categories(
            self.eval_pools, lambda chunk: self.generator.generate(self.prompt_ids(chunk), 1, greedy=True).texts,
            score, self.g.eval.batch, self.dp_rank, self.dp_size,
            lambda xs: self.dp_sum(torch.tensor(xs, dtype=torch.float64)).tolist())

    def eval_metrics(self, reweight_after: bool) -> dict:
        res = self.evaluate()
        self.eval_items = {c: v.pop("correct") for c, v in res.items()}  # per prompt, for write_eval
        if not res:
            return {}
        n = sum(v["n"] for v in res.values())
        m = {"eval_accuracy": sum(v["accuracy"] * v["n"] for v in res.values()) / n, "eval_n": float(n)}
        for c, v in res.items():
            m[f"eval_accuracy/{c}"], m[f"eval_reward/{c}"] = v["accuracy"], v["reward"]
            m[f"eval_n/{c}"] = float(v["n"])
        if reweight_after and self.g.eval.reweight:
            self.sampler.weights = reweight(self.sampler.weights, self.base_weights,
                                            {c: v["accuracy"] for c, v in res.items()},
                                            max_ratio=self.g.eval.reweight_max_ratio, rate=self.g.eval.reweight_rate)
        m.update({f"weight/{c}": w for c, w in self.sampler.weights.items()})
        return m

    # ------------------------------------------------------------------------------------------- loop
    def state(self) -> dict:
        return {"grpo": {"sampler": self.sampler.state_dict(), "rollout": self.generator.state_dict(),
                         "category_weights": dict(self.sampler.weights)}}

    def run(self) -> dict:
        cfg, g, tr = self.cfg, self.g, self.trainer
        extra = tr.resume()
        if extra and "grpo" in extra:
            self.sampler.load_state_dict(extra["grpo"]["sampler"])
            self.generator.load_state_dict(extra["grpo"]["rollout"])
        tel = Telemetry(self.run_dir, enabled=self.info.is_main, tensorboard=cfg.logging.tensorboard,
                        progress_bar=cfg.logging.progress_bar, total_steps=cfg.train.max_steps // g.steps_per_rollout,
                        start_step=tr.step, local_rank=self.info.local_rank)
        every, k = cfg.checkpoint.every, g.steps_per_rollout
        while tr.step < cfg.train.max_steps:
            r, t0 = tr.step // k, time.perf_counter()
            metrics = self.eval_metrics(True) if g.eval.every and r % g.eval.every == 0 else {}
            if metrics and tr.step == 0:
                self.write_eval("eval_initial.json", metrics)
            t1 = time.perf_counter()
            groups, rm = self.collect()
            rm.update(self.generator.pop_metrics())  # vllm: rollout_sync_s, rollout_logprob_abs_diff(_max)
            t2 = time.perf_counter()
            metrics.update(rm, **self.train_on(groups, r))
            metrics.update(rollout_time_s=t2 - t1, train_time_s=time.perf_counter() - t2,
                           step_time_s=time.perf_counter() - t0, rollout_step=r)
            tel.log(tr.step, metrics)
            if every > 0 and tr.step // every > (tr.step - k) // every and tr.step < cfg.train.max_steps:
                tr.save_checkpoint(self.state())
        last_state = self.state()  # for the checkpoint of the last step that save_final writes before the model
        final_eval = self.eval_metrics(False) if g.eval.every else {}
        self.generator.close()  # vllm: before torch.distributed goes down
        if final_eval:
            self.write_eval("eval_final.json", final_eval)
        tel.close(plot=cfg.logging.plot, keys=("loss", "reward_mean", "kl", "response_len"))
        return {"final": self.save_final(last_state), "eval": final_eval}

    def write_eval(self, name: str, metrics: dict) -> None:
        """run_dir/name: the eval metrics and each category's per-prompt correctness (eval_initial.json before any
        update, eval_final.json after the last step: report.md compares them prompt by prompt)."""
        if self.info.is_main:
            out = {"step": self.trainer.step, **metrics, "correct": self.eval_items}
            tmp = self.run_dir / f"{name}.tmp"
            tmp.write_text(json.dumps(out, indent=2))
            os.replace(tmp, self.run_dir / name)

    def save_final(self, extra: dict | None = None) -> str | None:
        return self.trainer.save_final(self.tok, extra)


def _outputs(out: dict, mb: dict) -> dict:
    return out


def _topk(out: dict, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return out["topk_ids"], out["topk_logprobs"]


@register_stage("grpo")
def run(cfg: Config) -> dict:
    return GRPORun(cfg).run()
