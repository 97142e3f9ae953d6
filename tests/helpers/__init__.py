"""Test helpers: builders (`tiny`), dense references (`reference`), and the scripts tests run as subprocesses.

Tests import them as `from helpers.tiny import build_tiny_gptq` (tests/ is on the path: pyproject's pytest
`pythonpath`). Scripts run by path (`torchrun tests/helpers/ddp_worker.py ...`) import only peft_qalora and,
for vllm_runner.py, its sibling vllm_reference_gemm.py.
"""

from pathlib import Path

HELPERS = Path(__file__).resolve().parent  # where the subprocess scripts live
