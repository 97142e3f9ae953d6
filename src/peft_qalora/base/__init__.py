"""Making and loading a GPTQ base: quantize, load, save, prepare for training."""
