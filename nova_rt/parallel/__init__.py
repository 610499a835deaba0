"""megatron-core glue: GPTModel from HF Llama/Qwen2 configs, HF <-> TP/PP shard conversion, packed batches, and the
`MegatronTrainer` the trainer drives when `parallel.backend: megatron`.

Modules: megatron_model (config mapping, layer specs, packed core attention), hf_convert (safetensors slices into
shards and back), packed (micro-batch validation, targets, padding, PackedSeqParams), megatron_trainer (DDP,
optimizer, pipeline schedules, train_step / logprobs / save_hf). Importing this package does not import megatron;
the submodules do.
"""

__all__ = ["MegatronTrainer"]


def __getattr__(name):
    if name == "MegatronTrainer":
        from nova_rt.parallel.megatron_trainer import MegatronTrainer

        return MegatronTrainer
    raise AttributeError(name)
