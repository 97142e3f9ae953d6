"""Making a GPTQ model trainable on the CPU (or GPU): what TRL and Trainer do not do for GPTQ."""

from __future__ import annotations

from torch import nn

from .load import gptq_linear_names, supports_training, use_eager_dequant


def prepare_model_for_training(model: nn.Module, gradient_checkpointing: bool = True, eager_dequant: bool = True):
    """Freeze the base, enable input gradients and gradient checkpointing, check the kernel trains.

    Call it on the GPTQ model before `get_peft_model` (or on the PeftModel, it is idempotent).

    Args:
        gradient_checkpointing: recompute activations in backward (non-reentrant), trading ~30% step
            time for memory; needs input gradients because every base weight is frozen.
        eager_dequant: undo GPTQModel's lazy torch.compile of the dequantization, which costs
            ~60-100 s of compiling per process on a CPU (see `quantized.use_eager_dequant`).
    Raises:
        ValueError: a GPTQ layer's kernel cannot run backward.
    """
    names = gptq_linear_names(model)
    if not names:
        raise ValueError(
            "prepare_model_for_training: the model has no GPTQ quantized linears; load a GPTQ checkpoint with "
            "peft_qalora.load_gptq_model(path)."
        )
    inference_only = sorted({type(model.get_submodule(n)).__name__ for n in names if not supports_training(model.get_submodule(n))})
    if inference_only:
        raise ValueError(
            f"prepare_model_for_training: the GPTQ kernel(s) {inference_only} are inference-only and cannot run "
            "backward. Load the model with GPTQConfig(bits=..., backend='gptq_torch'), or simply with "
            "peft_qalora.load_gptq_model(path)."
        )
    for name, param in model.named_parameters():
        if ".qalora_" not in name and "modules_to_save" not in name:
            param.requires_grad_(False)
    if eager_dequant:
        use_eager_dequant(model)
    if gradient_checkpointing and hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return model
