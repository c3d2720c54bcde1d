"""`rlhfkit sft`: supervised fine-tuning on demonstrations (the policy PPO starts from).

The fine-tuning itself (response-only loss, truncation, held-out eval, LoRA, DeepSpeed,
checkpoints and --resume) lives in rlhfkit.finetune, which `critique-revise train` uses too.
"""

from rlhfkit.finetune import SFTConfig, run_sft

__all__ = ["SFTConfig", "run_sft"]
