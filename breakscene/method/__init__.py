"""The Break-A-Scene method: losses, attention capture, union sampling, the training step and phases, new tokens, prior preservation, LoRA."""
