"""Multi-layer activation checkpointing (the Baichuan report's variant): decoder layers are grouped k at a time and
each group is recomputed as one unit in backward, so only the group inputs are kept: memory ~ (L/k)·h + k·n
instead of L·n, trading one extra forward per group. k = 1 is ordinary per-layer checkpointing.

The layers' `forward` attributes are replaced on the instances (the first layer of a group runs the whole group
under torch.utils.checkpoint; the others pass their input through), so parameter names and the state dict are
unchanged and checkpoints/HF saves are unaffected.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _passthrough(hidden_states, *args, **kwargs):
    return hidden_states


def apply_group_checkpointing(decoder_layers, k: int) -> int:
    """Checkpoint groups of k consecutive layers; returns the number of groups."""
    if k <= 0:
        return 0
    layers = list(decoder_layers)
    groups = 0
    for start in range(0, len(layers), k):
        group = layers[start:start + k]
        forwards = [layer.forward for layer in group]

        def run_group(hidden_states, *args, _forwards=tuple(forwards), **kwargs):
            def body(h):
                for fwd in _forwards:
                    out = fwd(h, *args, **kwargs)
                    h = out[0] if isinstance(out, tuple) else out
                return h

            if torch.is_grad_enabled():
                return checkpoint(body, hidden_states, use_reentrant=False)
            return body(hidden_states)

        group[0].forward = run_group
        for layer in group[1:]:
            layer.forward = _passthrough
        groups += 1
    return groups
