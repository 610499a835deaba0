"""GRPO with `parallel.backend: megatron`: the HF stage's loop (GRPORun: rollouts, rewards, dynamic sampling, eval
and re-weighting, grpo_loss via rl_loss_from_outputs, exact resume) with the policy trained by MegatronBackend.

What changes against the HF backend:
  - policy log-probs (and entropy, a statistic) come from the vocab-parallel cross entropy on the last pipeline stage
    at the sampling temperature, selected at the response tokens, and go to the same loss; gradients are summed over
    micro-batches and DP ranks of the globally normalised loss (nova_rt.parallel.megatron_backend.train_step);
  - old log-probs (ppo_epochs x minibatches > 1) come from the policy backend in forward-only mode, reference
    log-probs (grpo.loss.beta > 0 or grpo.ptx.coef > 0) from a frozen second backend of grpo.ref_model (default: the
    initial policy);
  - the report's top-k KL (grpo.loss.kl=topk, in the reward or the loss) and the PTX term: the reference backend's top-k
    ids and log-probs and the policy's log-probs at those ids come from the vocab-parallel logits across TP ranks
    (nova_rt.parallel.vocab_parallel: global logsumexp by all-reduce, per-shard top-k merged over the TP group with
    ties by lowest id as in the HF path, an autograd Function for the policy side), on the last pipeline stage;
    then the HF stage's topk_kl, rl_loss_from_outputs and ptx_loss_from_outputs. PTX rows use temperature 1;
  - rollouts still run on the HF model (nova_rt.rollout): before every rollout and eval, the HF model is loaded with
    the current weights gathered from the megatron shards (hf_convert's mapping; a full copy on every rank). Only
    the first rank of each model-parallel group (TP x PP) generates and scores; it broadcasts the groups to the
    other ranks of its group,
    so every rank of a replica trains on identical rollouts even where generation is not bitwise reproducible.
    Prompts are split over data-parallel ranks (grpo.sampling.prompts_per_step must still divide by the world size);
  - checkpoints: nova_rt.parallel.checkpoint, with the sampler and rollout RNG state as each rank's extra state.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist

from nova_rt.backends.megatron import MegatronPolicy, megatron_backend, save_megatron_final
from nova_rt.config import Config
from nova_rt.data.chat import IGNORE
from nova_rt.losses.kl import sampled_kl, topk_kl
from nova_rt.parallel.packed import from_shifted
from nova_rt.stages.grpo.losses import ptx_loss_from_outputs, rl_loss_from_outputs
from nova_rt.stages.grpo.run import GRPORun

log = logging.getLogger(__name__)


def _at_targets(out: dict, targets: torch.Tensor) -> dict:
    """The backend's outputs at the target (response / supervised) tokens only, the layout of the HF stage's
    PolicyLogprobs: per-token ones are selected, the top-k ones already are."""
    mask = (targets != IGNORE).to(out["logprobs"].device)
    return {k: v[mask] if k in ("logprobs", "entropy") else v for k, v in out.items()}


def _responses(out: dict, mb: dict) -> dict:
    return {k: v.cpu() for k, v in _at_targets(out, mb["targets"]).items()}


def _topk(out: dict, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return out["topk_ids"].cpu(), out["topk_logprobs"].cpu()


def _dp_sum(t: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return t


class _GRPOPolicy(MegatronPolicy):
    """MegatronPolicy as GRPORun drives nova_rt.trainer.Trainer (maybe_resume, autocast), with GRPO's step options."""

    def autocast(self):
        return contextlib.nullcontext()  # precision is model.dtype on this backend

    def maybe_resume(self) -> dict | None:
        return self.resume()

    def train_step(self, micro_batches: list[dict], objective, **options) -> dict:
        return super().train_step(micro_batches, objective, entropy=True, topk_ids="ref_topk_ids", **options)


class MegatronGRPORun(GRPORun):
    """GRPORun with the policy (and reference) on megatron-core; see the module docstring."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.loss_fn = self._loss
        self._synced_step = 0  # the policy step whose weights the HF generation model holds

    def build_trainer(self) -> _GRPOPolicy:
        backend = megatron_backend(self.cfg)
        from megatron.core import parallel_state as ps

        self.dp_rank, self.dp_size, self.dp_sum = backend.dp_rank, backend.dp_size, _dp_sum
        self.dp_group = ps.get_data_parallel_group()
        return _GRPOPolicy(self.cfg, backend, self.run_dir, self.g.sampling.temperature, info=self.info)

    def _load_ref(self):
        return megatron_backend(self.cfg, self.g.ref_model or None, trainable=False)

    # ------------------------------------------------------------------------------------------- rollouts
    def _sync_generation_model(self) -> None:
        """Collective: load the policy's current weights into the HF model that generates."""
        if self._synced_step == self.trainer.step:
            return
        state = self.trainer.backend.hf_state_dict()
        missing, unexpected = self.hf.load_state_dict(state, strict=False)
        allowed = {"lm_head.weight"} if self.trainer.backend.arch.tied else set()
        if unexpected or set(missing) - allowed:
            raise RuntimeError(f"megatron -> HF weight sync: missing {missing}, unexpected {unexpected}")
        self._synced_step = self.trainer.step

    def _on_first_model_parallel_rank(self, fn):
        """fn() on the first rank of this model-parallel group, its result broadcast to the others."""
        from megatron.core import parallel_state as ps

        group = ps.get_model_parallel_group()
        box = [fn() if dist.get_rank(group) == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        return box[0]

    def collect(self) -> tuple[list[dict], dict]:
        self._sync_generation_model()
        return self._on_first_model_parallel_rank(super().collect)

    def evaluate(self) -> dict[str, dict[str, float]]:
        self._sync_generation_model()
        return self._on_first_model_parallel_rank(super().evaluate)

    # ------------------------------------------------------------------------------------------- training
    def _ref_topk(self, mb: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's top-k ids and log-probs at the target tokens (the HF stage's `_ref_topk`), vocab-parallel."""
        return self.ref.forward([from_shifted(mb)], _topk, temperature=temperature, topk=self.g.loss.topk)[0]

    @torch.no_grad()
    def precompute(self, mb: dict) -> dict:
        """Reference top-k ids / log-probs or sampled-token log-probs (beta > 0) and, for batches that serve several
        steps, the rollout policy's log-probs (at the reference's top-k ids too, for the top-k KL in the reward)."""
        g, T = self.g, self.g.sampling.temperature
        mb = from_shifted(mb)
        topk = g.loss.kl == "topk"
        if self.ref is not None and g.loss.beta > 0:
            if topk:
                mb["ref_topk_ids"], mb["ref_topk_lp"] = self._ref_topk(mb, T)
            else:
                mb["ref_lp"] = self.ref.forward([mb], _responses, temperature=T)[0]["logprobs"]
        if g.steps_per_rollout > 1:
            out = self.trainer.backend.forward([mb], _responses, temperature=T, topk_ids="ref_topk_ids")[0]
            mb["old_lp"] = out["logprobs"]
            if g.loss.beta > 0 and g.loss.kl_placement == "reward":
                mb["old_kl"] = topk_kl(out["topk_logprobs"], mb["ref_topk_lp"]) if topk \
                    else sampled_kl(mb["old_lp"], mb["ref_lp"], g.loss.kl)
        return mb

    def ptx_micro_batches(self, r: int) -> list[dict]:
        return [{**mb, "temperature": 1.0} for mb in super().ptx_micro_batches(r)]  # RL rows: grpo.sampling.temperature

    def _loss(self, out: dict, mb: dict):
        device = out["logprobs"].device
        mb = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}
        out = _at_targets(out, mb["targets"])
        return ptx_loss_from_outputs(out, mb, self.g) if mb["kind"] == "ptx" else rl_loss_from_outputs(out, mb, self.g)

    def save_final(self) -> str | None:
        if self.cfg.checkpoint.save_final:
            self.trainer.guard.refuse_model(self.trainer.step)
        return save_megatron_final(self.cfg, self.info, self.trainer.backend, self.tok, self.run_dir)

