"""QA-LoRA: config, layer and model, one folder per method as peft keeps them."""
