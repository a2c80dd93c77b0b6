"""A vLLM plugin: LoRA on vLLM's CPU backend by groups of rows that share an adapter.

vLLM 0.32's CPU LoRA ops (``vllm/lora/ops/torch_ops``) copy every token's LoRA matrices out
of the stacked slots (``weights[indices]``, a [tokens, out, in] tensor) and multiply them one
token at a time. A batch then costs more than its requests one by one: on the demo model, 256
/infill requests ran 8x slower with an adapter than without, and batching them gained
nothing. These ops multiply each group of rows that uses one adapter in a single matmul.

They also give rows without an adapter (index -1) no delta. The originals index the slots
with -1, which is the last slot: once every slot holds an adapter, base-model rows batched
with adapter rows got that adapter's delta.

And the plugin asks Linux for the AMX tiles in each process. vLLM's CPU attention uses them in
bfloat16 where the CPU has them, but never asks: a process may use AMX only once it has, and
with LoRA enabled nothing else did, so the first bfloat16 step died of an illegal instruction.

Registered as a ``vllm.general_plugins`` entry point (pyproject.toml), so vLLM loads it in
each of its processes, the engine core's included. It changes nothing but the CPU backend of
the vLLM version it was written for.
"""

from __future__ import annotations

import torch

FOR_VLLM = "0.32.0"


def add_lora(target: torch.Tensor, inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
             scale: float = 1.0, add: bool = True) -> None:
    """``target[t] (+)= scale * inputs[t] @ weights[indices[t]].T`` in place, one matmul per adapter
    present; rows of index -1 (no adapter) get nothing added. ``weights``: [slots, (1,) out, in],
    cut to the target's width. One input row for many target rows adds to all of them (vLLM's
    expand does so)."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    weights, inputs = weights[:, : target.shape[1]].to(target.dtype), inputs.to(target.dtype)
    slots = torch.unique(indices).tolist()
    if not add:
        target.zero_()
    if len(slots) == 1 and slots[0] >= 0 and inputs.shape[0] == target.shape[0]:
        target.addmm_(inputs, weights[slots[0]].T, alpha=scale)  # one adapter for all: no temporaries
        return
    for slot in slots:
        if slot < 0:
            continue
        if inputs.shape[0] != target.shape[0]:
            target += scale * (inputs @ weights[slot].T)
        else:
            rows = (indices == slot).nonzero().squeeze(1)
            target.index_add_(0, rows, inputs[rows] @ weights[slot].T, alpha=scale)


def bgmv_shrink(inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, scaling: float = 1.0) -> None:
    add_lora(output_tensor[:, : lora_a_weights.shape[-2]], inputs, lora_a_weights, lora_indices_tensor, scaling, False)


def bgmv_expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, add_inputs: bool = True) -> None:
    width = min(lora_b_weights.shape[-2], output_tensor.shape[1])  # adapter and model may pad differently
    add_lora(output_tensor[:, :width], inputs, lora_b_weights, lora_indices_tensor, add=add_inputs)


def bgmv_expand_slice(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                      lora_indices_tensor: torch.Tensor, slice_offset: int, slice_size: int,
                      add_inputs: bool = True) -> None:
    add_lora(output_tensor[:, slice_offset: slice_offset + slice_size], inputs, lora_b_weights,
             lora_indices_tensor, add=add_inputs)


def register() -> None:
    """The plugin's entry point: swap the grouped ops in where vLLM's CPU LoRA looks them up."""
    import vllm
    from vllm.platforms import current_platform

    if vllm.__version__ != FOR_VLLM or not current_platform.is_cpu():
        return
    from vllm.lora.ops.torch_ops import lora_ops  # its sgmv_* ops call these by module name
    from vllm.lora.punica_wrapper import punica_cpu  # imported them by name

    torch.cpu._init_amx()  # a no-op without AMX
    for module in (lora_ops, punica_cpu):
        module.bgmv_shrink, module.bgmv_expand = bgmv_shrink, bgmv_expand
        module.bgmv_expand_slice = bgmv_expand_slice
