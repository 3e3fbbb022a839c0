"""Speed switches: bf16 autocast (`train.precision`, `sample.precision`; "auto" by default, bf16 where
the device computes it natively), and, for training, channels_last and torch.compile (`[train]` keys
channels_last, compile; off by default).

Each switch changes how the step runs, never what it optimizes: the weights, the optimizer's
moments and the EMA stay float32 and keep their names, so checkpoints are the same files with
every switch on or off, and a run may change a switch when it resumes.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import nn

from diffuse.errors import UserError

if TYPE_CHECKING:  # config imports validation, which imports this module
    from diffuse.config import TrainConfig

PRECISIONS = ("auto", "fp32", "bf16")  # train.precision and sample.precision

def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context to compute forward passes in: bf16 autocast where `precision` ("fp32", "bf16" or
    "auto", `chosen_precision`) comes to bf16 on this device.

    Autocast runs matrix products and convolutions in bf16 and keeps reductions and norms in
    float32; the float32 weights are cast on the fly, so nothing stored changes. bf16 has float32's
    exponent range, so unlike fp16 it needs no loss scaling. The backward pass runs outside the
    context (as PyTorch recommends) and follows the dtypes the forward chose.
    """
    if chosen_precision(precision, device)[0] == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def chosen_precision(precision: str, device: torch.device | str) -> tuple[str, str]:
    """(fp32 | bf16, why) for a precision setting: "auto" takes bf16 where the device computes it natively
    (`native_bf16`) and fp32 elsewhere, where emulated bf16 is far slower than fp32."""
    if precision != "auto":
        return precision, "asked for"
    if native_bf16(device):
        return "bf16", f"auto: {torch.device(device)} computes bf16 natively"
    return "fp32", f"auto: {torch.device(device)} has no native bf16 (no AVX-512 BF16 or AMX), where it is emulated"


def to_memory_format(x: torch.Tensor, t: TrainConfig) -> torch.Tensor:
    """x in channels_last (NHWC in memory) when train.channels_last is on and x is a 4-D image batch."""
    if t.channels_last and x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def prepare(module: nn.Module, t: TrainConfig) -> nn.Module:
    """`module` switched to channels_last and compiled, as train.channels_last and train.compile ask;
    returns the same module, changed in place.

    In place, so the parameters stay the ones an optimizer or EMA already holds, and the state_dict
    keeps its keys (torch.compile's wrapper would prefix them with `_orig_mod.`).
    """
    if t.channels_last:
        module.to(memory_format=torch.channels_last)  # 4-D weights (convolutions) only; others are unchanged
    if t.compile:
        check_compile_works(next(module.parameters()).device)
        module.compile()
    return module


def check_compile_works(device: torch.device) -> None:
    """Compile and run a two-op function, so a machine where torch.compile cannot work (no C++
    compiler for the CPU backend, an unsupported Python) is told in one sentence before training starts."""
    try:
        torch.compile(_compile_probe)(torch.ones(4, device=device))
    except Exception as e:  # noqa: BLE001 - whatever broke, the user's fix is the same
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"train.compile = true needs torch.compile, which fails on this machine ({first_line}); "
                        "set train.compile = false.") from None


def _compile_probe(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def native_bf16(device: torch.device | str) -> bool:
    """Whether the device computes bf16 in hardware: a CUDA device that supports it, or a CPU with
    AVX-512 BF16 or AMX. Elsewhere PyTorch emulates bf16 products, which run hundreds of times slower
    than fp32 (a 2048 x 2048 product: 166 s against 0.68 s on one core of an AMD EPYC without them)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so looked up with a default
    return device.type == "cpu" and any(getattr(torch.cpu, name, lambda: False)() for name in probes)
