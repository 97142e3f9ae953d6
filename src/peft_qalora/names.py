"""Names and defaults shared across the families, one source for each. Imports nothing.

A name that two folders must agree on (a PEFT type, a merge strategy, an export format, a GPTQ tensor
suffix, a default) is defined here once; the modules that use it import it from here.
"""

# --- the peft methods: the PeftType member each registers as, and the prefix of its parameter names ----------
QALORA = "QALORA"
QALORA_PREFIX = "qalora_"
QAVERA = "QAVERA"
QAVERA_PREFIX = "qavera_"

# --- merging: how shifted zero points become integers (README's quality table) -------------------------------
MERGE_STRATEGIES = ("nearest", "calibrated", "exact")
DEFAULT_MERGE_STRATEGY = "exact"

# --- training defaults, shared by QALoraConfig, TrainSettings and the CLI ------------------------------------
DEFAULT_LORA_ALPHA = 32  # the update is scaled by lora_alpha / r; the quality and distributed benchmarks use 32
DEFAULT_SCALES_ONLY = True  # `train` with no adapter option trains the fp16 scales only (README's quality table)

# --- the GPTQ format ------------------------------------------------------------------------------------------
SUPPORTED_BITS = (2, 3, 4, 8)  # the widths GPTQ packs into int32 words, and every reader and writer here takes
GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")  # the tensors of one quantized linear, `<name>.<suffix>`

# --- exports --------------------------------------------------------------------------------------------------
FOLDER_FORMATS = ("awq", "compressed-tensors")  # a model folder, written by exports/stream.py
FILE_FORMATS = ("gguf",)  # one file, written by exports/gguf/
EXPORT_FORMATS = FOLDER_FORMATS + FILE_FORMATS
GGUF_EMBEDDINGS = ("f16", "q8_0")  # the GGUF token embedding / output head: as the GPTQ folder holds it, or Q8_0
