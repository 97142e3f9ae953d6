"""QA-VeRA: VeRA's shared random projections on the group-pooled input of a GPTQ model, merged into zeros.

One folder per method, as peft keeps them: `config.py` (`QAVeraConfig`), `layer.py` (`QAVeraLinear`, a
`QALoraLinear` whose factors are `d * A` and `b * B`) and `model.py` (`QAVeraModel`, the tuner that owns the
shared projections). The projections themselves are `merge/projections.py` (torch only, so the file-to-file
merge can rebuild them from the PRNG key without importing peft). The last line registers the method.
"""

from ...names import QAVERA, QAVERA_PREFIX
from ..registration import register
from .config import QAVeraConfig
from .layer import QAVeraLinear
from .model import QAVeraModel

__all__ = ["QAVeraConfig", "QAVeraLinear", "QAVeraModel"]

register(QAVERA, QAVERA_PREFIX, QAVeraConfig, QAVeraModel)
