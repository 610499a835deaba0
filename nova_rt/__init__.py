"""nova_rt: a training runtime for the Baichuan alignment pipeline (PAS -> SFT -> merge -> RM/DPO/GRPO)."""

__version__ = "0.1.0"
