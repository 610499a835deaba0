"""megatron-core glue: GPTModel from HF Llama/Qwen2 configs, HF <-> TP/PP shard conversion, packed batches, and the
`MegatronBackend` the trainer drives when `parallel.backend: megatron`.

Modules: megatron_model (config mapping, layer specs, packed core attention), hf_convert (safetensors slices into
shards and back), packed (micro-batch validation, targets, padding, PackedSeqParams), megatron_backend (DDP,
optimizer, pipeline schedules, train_step / logprobs / save_hf). Importing this package does not import megatron;
the submodules do.
"""

__all__ = ["MegatronBackend"]


def __getattr__(name):
    if name == "MegatronBackend":
        from nova_rt.parallel.megatron_backend import MegatronBackend

        return MegatronBackend
    raise AttributeError(name)
