"""GGUF: Q4_1 blocks from GPTQ codes (q4_1), and llama.cpp's converter for the rest of the file (llamacpp)."""
