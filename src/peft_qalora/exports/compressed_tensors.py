"""compressed-tensors `pack-quantized` (what llm-compressor writes): asymmetric 2/3/4/8-bit, act-order too.

Design note. Per linear, from the `compressed-tensors` package's `PackedQuantizationCompressor`:
- `weight_packed` int32 (out, ceil(in / pf)), `pf = 32 // bits` values a word, packed along the INPUT dim,
  LSB first, unused high bits zero (3-bit: 10 values a word, not GPTQ's 32-in-3-words);
- `weight_zero_point` int32 (ceil(out / pf), n_groups), packed along the OUTPUT dim;
- values are signed ints offset by `2^(bits-1)` before packing, so a stored field IS the unsigned code
  (or true zero), and dequantization `(q - zp) * scale` is GPTQ's `(q - z) * s`;
- `weight_scale` (out, n_groups) in the model's dtype, `weight_shape` int64 [out, in];
- `weight_g_idx` (in,) for `actorder: "group"`: the group of every input, GPTQ's `g_idx` as is.
The config is what the package's `QuantizationConfig` dumps (written out, checked against it); packing is GPTQ's own where the two agree (2/4/8
bits, no padding: `weight_packed` is qweight transposed, `weight_zero_point` our `pack_cols` transposed) and the
package's `pack_to_int32` elsewhere (checked against it in tests/test_export.py).
"""

from __future__ import annotations

import torch

from ..gptq.packing import pack_cols
from ..gptq.tensors import QuantTensors, true_zero_words
from ..names import SUPPORTED_BITS
from .stream import LayerInfo, QuantFormat, check_zero_range



def weight_packed(tensors: QuantTensors) -> torch.Tensor:
    """int32 (out, ceil(in / pf)) codes packed along the inputs, LSB first. At 2/4/8 bits that is GPTQ's own
    packing (pf values a word, the first in the lowest bits), so a transpose of qweight whenever no padding
    word is needed; 3 bits (10 values a word here, 32 in 3 words in GPTQ) are unpacked and packed again."""
    bits, n_in = tensors.bits, tensors.in_features
    pf = 32 // bits
    if bits != 3 and n_in % pf == 0 and tensors.qweight.shape[0] >= n_in // pf:
        return tensors.qweight[: n_in // pf].T.contiguous()
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # imports transformers: seconds

    offset = 1 << (bits - 1)
    return pack_to_int32((tensors.codes().T - offset).to(torch.int8).contiguous(), bits)


def weight_zero_point(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """True zeros (n_groups, out) packed along the outputs: int32 (ceil(out / pf), n_groups), GPTQ's `pack_cols`
    transposed at 2/4/8 bits when no padding is needed (the package's `pack_to_int32` imports transformers).
    `convert` takes the packed words straight from qzeros where it can (`true_zero_words`)."""
    pf = 32 // bits
    if bits != 3 and zeros.shape[1] % pf == 0:
        return pack_cols(zeros.to(torch.int32), bits).T
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32((zeros.T - (1 << (bits - 1))).to(torch.int8).contiguous(), bits, packed_dim=0)


def zero_point_of(name: str, tensors: QuantTensors) -> torch.Tensor:
    """`weight_zero_point` of a layer: its zero words transposed where GPTQ's packing is the package's (2/4/8 bits,
    whole words: fields in range by construction), else unpacked, checked and packed again."""
    words = true_zero_words(tensors.qzeros, tensors.bits, tensors.zero_format, tensors.out_features)
    if words is not None:
        return words.T
    zeros = tensors.zeros()  # (n_groups, out): true zeros
    check_zero_range(name, zeros, tensors.bits)
    return weight_zero_point(zeros, tensors.bits)


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
        out = {
            "weight_packed": weight_packed(tensors),  # (out, in/pf)
            "weight_zero_point": zero_point_of(name, tensors),  # (out/pf, n_groups)
            "weight_scale": tensors.scales.T.half().contiguous(),  # (out, n_groups)
            "weight_shape": torch.tensor([tensors.out_features, tensors.in_features], dtype=torch.int64),
        }
        if self.act_order:  # the config then says actorder "group" for every layer
            out["weight_g_idx"] = tensors.g_idx.to(torch.int32)
        return out

    def quant_config(self, source: dict, layers: list[LayerInfo], float_linears: list[str]) -> dict:
        """The package's `QuantizationConfig(...).model_dump(mode="json", exclude_none=False)`, spelled out: importing
        the package costs seconds (it imports transformers); tests/test_export.py checks it field for field."""
        weights = {"num_bits": layers[0].bits, "type": "int", "symmetric": False, "group_size": layers[0].group_size,
                   "strategy": "group", "block_structure": None, "dynamic": False,
                   "actorder": "group" if self.act_order else None, "scale_dtype": None, "zp_dtype": "torch.int8",
                   "observer": "memoryless_minmax", "observer_kwargs": {}}
        scheme = {"targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None,
                  "format": None}
        return {"config_groups": {"group_0": scheme}, "quant_method": "compressed-tensors", "kv_cache_scheme": None,
                "format": "pack-quantized", "quantization_status": "compressed", "global_compression_ratio": None,
                "ignore": sorted(set(float_linears) | {"lm_head"})}

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
