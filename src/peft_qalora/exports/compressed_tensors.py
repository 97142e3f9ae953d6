"""compressed-tensors `pack-quantized` (what llm-compressor writes): asymmetric 2/3/4/8-bit, act-order too.

Design note. Per linear, from the `compressed-tensors` package's `PackedQuantizationCompressor`:
- `weight_packed` int32 (out, ceil(in / pf)), `pf = 32 // bits` values a word, packed along the INPUT dim,
  LSB first, unused high bits zero (3-bit: 10 values a word, not GPTQ's 32-in-3-words);
- `weight_zero_point` int32 (ceil(out / pf), n_groups), packed along the OUTPUT dim;
- values are signed ints offset by `2^(bits-1)` before packing, so a stored field IS the unsigned code
  (or true zero), and dequantization `(q - zp) * scale` is GPTQ's `(q - z) * s`;
- `weight_scale` (out, n_groups) in the model's dtype, `weight_shape` int64 [out, in];
- `weight_g_idx` (in,) for `actorder: "group"`: the group of every input, GPTQ's `g_idx` as is.
The config uses the package itself (`QuantizationConfig`); packing is GPTQ's own where the two agree (2/4/8
bits, no padding: `weight_packed` is qweight transposed, `weight_zero_point` our `pack_cols` transposed) and the
package's `pack_to_int32` elsewhere (checked against it in tests/test_export.py).
"""

from __future__ import annotations

import torch

from ..gptq.packing import pack_cols
from ..gptq.tensors import QuantTensors
from ..names import SUPPORTED_BITS
from .stream import LayerInfo, QuantFormat, check_zero_range



def weight_packed(tensors: QuantTensors) -> torch.Tensor:
    """int32 (out, ceil(in / pf)) codes packed along the inputs, LSB first. At 2/4/8 bits that is GPTQ's own
    packing (pf values a word, the first in the lowest bits), so a transpose of qweight whenever no padding
    word is needed; 3 bits (10 values a word here, 32 in 3 words in GPTQ) are unpacked and packed again."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    bits, n_in = tensors.bits, tensors.in_features
    pf = 32 // bits
    if bits != 3 and n_in % pf == 0 and tensors.qweight.shape[0] >= n_in // pf:
        return tensors.qweight[: n_in // pf].T.contiguous()
    offset = 1 << (bits - 1)
    return pack_to_int32((tensors.codes().T - offset).to(torch.int8).contiguous(), bits)


def weight_zero_point(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """True zeros (n_groups, out) packed along the outputs: int32 (ceil(out / pf), n_groups), GPTQ's `pack_cols`
    transposed at 2/4/8 bits when no padding is needed (the package's `pack_to_int32` imports transformers)."""
    pf = 32 // bits
    if bits != 3 and zeros.shape[1] % pf == 0:
        return pack_cols(zeros.to(torch.int32), bits).T
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32((zeros.T - (1 << (bits - 1))).to(torch.int8).contiguous(), bits, packed_dim=0)


class CompressedTensorsFormat(QuantFormat):
    name = "compressed-tensors"

    def check(self, layer: LayerInfo) -> None:
        if layer.bits not in SUPPORTED_BITS:
            raise ValueError(f"export compressed-tensors: {layer.name} is {layer.bits}-bit; supported: {SUPPORTED_BITS}.")
        if layer.in_features % layer.group_size:
            raise ValueError(f"export compressed-tensors: {layer.name} has {layer.in_features} inputs, not a multiple "
                             f"of its group size {layer.group_size}; the format needs whole groups.")

    def specs(self, layer: LayerInfo) -> dict[str, tuple[str, tuple[int, ...]]]:
        pf, n_in, n_out, n_groups = 32 // layer.bits, layer.in_features, layer.out_features, layer.n_groups
        specs = {"weight_packed": ("I32", (n_out, -(-n_in // pf))), "weight_zero_point": ("I32", (-(-n_out // pf), n_groups)),
                 "weight_scale": ("F16", (n_out, n_groups)), "weight_shape": ("I64", (2,))}
        if self.act_order:
            specs["weight_g_idx"] = ("I32", (n_in,))
        return specs

    def convert(self, name: str, tensors: QuantTensors) -> dict[str, torch.Tensor]:
        zeros = tensors.zeros()  # (n_groups, out): true zeros
        check_zero_range(name, zeros, tensors.bits)
        out = {
            "weight_packed": weight_packed(tensors),  # (out, in/pf)
            "weight_zero_point": weight_zero_point(zeros, tensors.bits),  # (out/pf, n_groups)
            "weight_scale": tensors.scales.T.half().contiguous(),  # (out, n_groups)
            "weight_shape": torch.tensor([tensors.out_features, tensors.in_features], dtype=torch.int64),
        }
        if self.act_order:  # the config then says actorder "group" for every layer
            out["weight_g_idx"] = tensors.g_idx.to(torch.int32)
        return out

    def quant_config(self, source: dict, layers: list[LayerInfo], float_linears: list[str]) -> dict:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

        weights = QuantizationArgs(num_bits=layers[0].bits, type="int", symmetric=False, strategy="group",
                                   group_size=layers[0].group_size, actorder="group" if self.act_order else None)
        config = QuantizationConfig(
            config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
            format="pack-quantized", quantization_status="compressed",
            ignore=sorted(set(float_linears) | {"lm_head"}),
        )
        return config.model_dump(mode="json", exclude_none=False)


    def notes(self, layers: list[LayerInfo]) -> list[str]:
        notes = []
        if self.act_order:
            notes.append("vLLM 0.32 refuses compressed-tensors with actorder 'group' (transformers and the "
                         "compressed-tensors package read it); serve a base quantized without --desc-act")
        if layers[0].bits != 4:
            notes.append(f"vLLM 0.32 has no kernel for asymmetric {layers[0].bits}-bit weights"
                         + (" except Machete (Hopper GPUs)" if layers[0].bits == 8 else "")
                         + "; asymmetric 4-bit runs everywhere (CPU, Marlin, Machete, Triton)")
        return notes
