"""Names and defaults shared across the families, one source for each. Imports nothing.

A name that two folders must agree on (a PEFT type, a merge strategy, an export format, a GPTQ tensor
suffix, a default) is defined here once; the modules that use it import it from here.
"""

# --- the peft methods: the PeftType member each registers as, and the prefix of its parameter names ----------
QALORA = "QALORA"
QALORA_PREFIX = "qalora_"
QAVERA = "QAVERA"
QAVERA_PREFIX = "qavera_"
