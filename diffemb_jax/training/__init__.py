"""Training: losses, LoRA, data, the train step and loop."""
