"""A reference `torch.ops._C.cpu_gemm_wna16` for vLLM CPU wheels built without it.

vLLM 0.32's CPU wheel has the int4 GEMM in `_C.abi3.so` (loaded on AVX-512 + BF16 CPUs) and
`_C_AVX512.abi3.so` (AVX-512 without BF16) but not in `_C_AVX2.abi3.so` (`CpuPlatform.import_kernels`
picks one): on an AVX2-only CPU the first forward of any GPTQ/AWQ/compressed-tensors W4A16 model
fails. This module defines the op under the same schema (read from `_C.abi3.so`), computing exactly
what the C++ kernel (`csrc/cpu/cpu_wna16.cpp`) computes from the tensors that
`CPUWNA16LinearKernel.process_weights_after_loading` (vllm/model_executor/kernels/linear/
mixed_precision/cpu.py, `_process_gptq_weights_w4a16`) leaves on the layer:

* `q_weight` int32 `(N/16, K*2)`: row `b` holds output columns `16b .. 16b+15`; for input `k`,
  words `[2k, 2k+1]` hold columns `16b + 0..7` and `16b + 8..15`, column `8h + j` of the block in
  bits `4j..4j+3` of word `h` (vLLM's `pack_quantized_values_into_int32` along N, then blocked).
* `scales` `(G, N)` in the activation dtype; group of input `k` is `k // (K / G)`.
* `zeros` int32 `(G, N/8)` or None, packed along N (slot `j` of word `w` is column `8w + j`).
  With zeros: `w = (q - z) * s` (uint4, AWQ / asymmetric compressed-tensors). Without: `w = (q - 8) *
  s` (uint4b8, symmetric GPTQ), the kernel's fixed LUT `[-8 .. 7]`.
* `bias` `(N,)` or None; `output` `(M, N)` written in place.

Imported only by tests/helpers/vllm_runner.py, inside the vLLM venv. Run as a script, it compares itself with
the compiled op on random cases where the loaded library has one (tests/test_vllm_serving.py).
"""

from __future__ import annotations

import torch

SCHEMA = ("cpu_gemm_wna16(Tensor input, Tensor q_weight, Tensor(a2!) output, Tensor scales, Tensor? zeros, "
          "Tensor? bias, SymInt pack_factor, str isa_hint) -> ()")
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
_LIBRARY = None  # keeps the registration alive for the life of the process


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 `(..., W)` -> codes `(..., W*8)`, slot j (bits 4j) of word w at index 8w + j."""
    return ((words.unsqueeze(-1) >> _SHIFTS) & 0xF).flatten(-2)


def dequantize(q_weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """The float32 weight `(K, N)` the kernel multiplies by, from vLLM's blocked tensors."""
    blocks, k_size = q_weight.shape[0], q_weight.shape[1] // 2
    codes = _nibbles(q_weight.reshape(blocks, k_size, 2))  # (N/16, K, 16): column 16b + c
    codes = codes.permute(1, 0, 2).reshape(k_size, blocks * 16).float()
    zero = _nibbles(zeros).float() if zeros is not None else torch.full_like(scales, 8, dtype=torch.float32)
    group = torch.arange(k_size) // (k_size // scales.shape[0])
    return (codes - zero[group]) * scales.float()[group]


def reference_gemm_wna16(input, q_weight, output, scales, zeros, bias, pack_factor, isa_hint):
    """`output = input @ W + bias` as the C++ kernel computes it."""
    # The same refusals as the C++ op, so the reference never runs a case the real kernel rejects.
    if pack_factor != 8 or isa_hint not in ("vec", "amx") or input.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"cpu_gemm_wna16 (reference): unsupported pack_factor={pack_factor}, "
                           f"isa_hint={isa_hint!r} or dtype {input.dtype}")
    if input.shape[1] % 32 or (q_weight.shape[0] * 16) % 32 or (input.shape[1] // scales.shape[0]) % 2:
        raise RuntimeError("cpu_gemm_wna16 (reference): K and N must be multiples of 32, group size even")
    # The kernel dequantizes into a buffer of the activation dtype, then accumulates in float32.
    weight = dequantize(q_weight, scales, zeros).to(input.dtype).float()
    result = input.float() @ weight
    if bias is not None:
        result += bias.float()
    output.copy_(result.to(output.dtype))


def install(force: bool = False) -> bool:
    """Register the reference as `_C::cpu_gemm_wna16` unless the loaded vLLM library has the op.

    `force` replaces the compiled op's CPU kernel too, so machines that have the op can still run
    the reference end to end. Returns whether the reference is now the op.
    """
    global _LIBRARY
    if hasattr(torch.ops._C, "cpu_gemm_wna16"):
        if not force:
            return False
        _LIBRARY = torch.library.Library("_C", "IMPL")
    else:
        _LIBRARY = torch.library.Library("_C", "FRAGMENT")
        _LIBRARY.define(SCHEMA)
    _LIBRARY.impl("cpu_gemm_wna16", reference_gemm_wna16, "CPU")
    return True


def _random_words(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """int32 words with every bit random, so packed codes span all 16 values."""
    return torch.randint(-2**31, 2**31, shape, generator=gen, dtype=torch.int64).to(torch.int32)


def _random_case(m: int, k: int, n: int, group_size: int, dtype: torch.dtype, with_zeros: bool, seed: int):
    """Random arguments in the op's layout; a bias on every other case."""
    gen = torch.Generator().manual_seed(seed)
    groups = k // group_size
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.001).to(dtype)
    zeros = _random_words(gen, groups, n // 8) if with_zeros else None
    bias = torch.randn(n, generator=gen).to(dtype) if seed % 2 else None
    return torch.randn(m, k, generator=gen).to(dtype), _random_words(gen, n // 16, k * 2), scales, zeros, bias


CASES = [(dtype, with_zeros, *shape) for dtype in (torch.float16, torch.bfloat16) for with_zeros in (False, True)
         for shape in ((1, 576, 192, 32), (7, 1536, 576, 64), (33, 576, 1536, 576))]  # (M, K, N, group size)


def compare_with_native() -> dict:
    """Max |reference - compiled op| / max |compiled op| per dtype and zeros, if this vLLM build has the op."""
    import vllm._custom_ops  # noqa: F401  loads the compiled library

    if not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        return {"native": False}
    worst: dict[str, float] = {}
    for seed, (dtype, with_zeros, m, k, n, group_size) in enumerate(CASES):
        x, q_weight, scales, zeros, bias = _random_case(m, k, n, group_size, dtype, with_zeros, seed)
        native, ours = torch.empty(m, n, dtype=dtype), torch.empty(m, n, dtype=dtype)
        torch.ops._C.cpu_gemm_wna16(x, q_weight, native, scales, zeros, bias, 8, "vec")
        reference_gemm_wna16(x, q_weight, ours, scales, zeros, bias, 8, "vec")
        rel = ((native.float() - ours.float()).abs().max() / native.float().abs().max()).item()
        key = f"{str(dtype).removeprefix('torch.')}-{'zeros' if with_zeros else 'nozeros'}"
        worst[key] = max(worst.get(key, 0.0), rel)
    return {"native": True, "max_rel_diff": worst}


if __name__ == "__main__":  # .venv-vllm/bin/python tests/helpers/vllm_reference_gemm.py -> one JSON line
    import json

    print(json.dumps(compare_with_native()))
