"""A scalar reward model: the causal LM's decoder plus a linear score head, packed forward, HF-compatible save.

The score of a sequence is head(hidden state at its last token), the same pooling as transformers'
`*ForSequenceClassification` (rightmost non-pad token), so a saved reward model loaded with
`AutoModelForSequenceClassification` (num_labels=1) scores an unpadded sequence exactly as training did, provided
the sequence does not end with the pad token (`check_last_tokens`).

The module holds a real transformers sequence-classification model (`LlamaForSequenceClassification`,
`Qwen2ForSequenceClassification`, ...) built around the causal LM's decoder (no copy; the LM head is dropped), so
its state dict is already the HF layout (`model.*`, `score.weight`) and `save_pretrained` writes a loadable
directory. Training runs the decoder on one packed row with cu_seqlens (documents never attend to each other).

Legend: S sequences of a packed row, T packed tokens, D model dim.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nova_rt.models.attention import packed_forward_kwargs


def sequence_classifier_from_causal(causal_lm: nn.Module, pad_token_id: int | None, *, seed: int = 0,
                                    init_std: float | None = None) -> nn.Module:
    """An HF `*ForSequenceClassification` (num_labels=1) sharing `causal_lm`'s decoder, with a fresh score head
    (normal(0, init_std or config.initializer_range), deterministic for `seed`)."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal_lm.config)
    try:
        cls = AutoModelForSequenceClassification._model_mapping[type(config)]
    except KeyError:
        raise ValueError(f"model type {config.model_type!r} has no sequence-classification class in transformers; "
                         "cannot build a reward model from it") from None
    config.num_labels = 1
    config.architectures = [cls.__name__]
    config.pad_token_id = pad_token_id
    config.use_cache = False
    if hasattr(config, "quantization_config"):  # the builtin model's dir keeps its GGUF origin; weights are fp32 now
        delattr(config, "quantization_config")
    with torch.device("meta"):
        seq_cls = cls(config)
    decoder = causal_lm.get_decoder()
    setattr(seq_cls, seq_cls.base_model_prefix, decoder)
    param = next(decoder.parameters())
    head = nn.Linear(config.hidden_size, 1, bias=False, device=param.device, dtype=param.dtype)
    std = init_std if init_std is not None else getattr(config, "initializer_range", 0.02)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen, dtype=torch.float32) * std)
    seq_cls.score = head
    return seq_cls


class RewardModel(nn.Module):
    """forward(packed row) -> (S,) fp32 scores, one per sequence."""

    def __init__(self, seq_cls: nn.Module):
        super().__init__()
        self.lm = seq_cls  # named `lm` like CausalLMLogprobs: the trainer's FSDP path shards lm.get_decoder().layers

    @classmethod
    def from_causal_lm(cls, causal_lm: nn.Module, pad_token_id: int | None, *, seed: int = 0) -> RewardModel:
        return cls(sequence_classifier_from_causal(causal_lm, pad_token_id, seed=seed))

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen) -> torch.Tensor:
        decoder = self.lm.get_decoder()
        out = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                      **packed_forward_kwargs(cu_seqlens, max_seqlen))
        hidden_TD = out.last_hidden_state[0]
        last_S = cu_seqlens[1:].long() - 1
        return self.lm.score(hidden_TD[last_S]).squeeze(-1).float()


def batch_scores(model: nn.Module, batch: dict) -> torch.Tensor:
    """Run a (possibly DDP-wrapped) RewardModel on a collated micro-batch: (S,) scores."""
    return model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"], batch["max_seqlen"])


def check_last_tokens(last_token_ids, pad_token_id: int | None, where: str = "reward model data") -> None:
    """Raise if a sequence ends with the pad token: HF sequence classifiers pool the rightmost non-pad token, so
    such a sequence would be scored at a different position after saving than during training."""
    if pad_token_id is None:
        return
    bad = [i for i, t in enumerate(last_token_ids) if int(t) == pad_token_id]
    if bad:
        raise ValueError(f"{where}: {len(bad)} sequence(s) end with the pad token id {pad_token_id} (first: "
                         f"sequence {bad[0]}); the saved model would pool a different token. Use a tokenizer whose "
                         "pad token differs from the chat template's last token")
