"""QA-LoRA: config, layer and model, one folder per method as peft keeps them; the last line registers."""

from ...names import QALORA, QALORA_PREFIX
from ..registration import register
from .config import QALoraConfig
from .layer import QALoraLayer, QALoraLinear
from .model import QALoraModel

__all__ = ["QALoraConfig", "QALoraLayer", "QALoraLinear", "QALoraModel"]

register(QALORA, QALORA_PREFIX, QALoraConfig, QALoraModel)
