"""Knowledge into weights: gated LoRA distillation (see the finetuner issue)."""
