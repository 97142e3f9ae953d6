"""peft-qalora: QA-LoRA on GPTQ models for Hugging Face peft.

`import peft_qalora` registers the QALORA method with peft; then `get_peft_model`,
`PeftModel.from_pretrained` and `save_pretrained` work as they do for LoRA.
"""

from .registry import register as _register

_register()

from .config import QALoraConfig  # noqa: E402
from .layer import QALoraLayer, QALoraLinear  # noqa: E402
from .model import QALoraModel  # noqa: E402
from .quantized import load_gptq_model, use_eager_dequant  # noqa: E402
from .save import save_quantized  # noqa: E402
from .training import prepare_model_for_training  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "QALoraConfig",
    "QALoraLayer",
    "QALoraLinear",
    "QALoraModel",
    "load_gptq_model",
    "prepare_model_for_training",
    "save_quantized",
    "use_eager_dequant",
]
