"""The peft methods: QA-LoRA (qalora/) and QA-VeRA (qavera/), and the pieces they share (pooling, kernels).

Importing this package imports peft and registers both methods: each method's `__init__` ends with its
`register(...)` call, as peft's own tuners do. `import peft_qalora` imports it once peft is imported.
"""

from . import qalora, qavera  # noqa: F401  (each registers itself with peft)
