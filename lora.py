"""LoRA by hand over `nn.Linear` or bitsandbytes' 4-bit `Linear4bit`, and 4-bit quantisation in memory:
y = base(x) + (alpha / r) * B(A(dropout(x))), B zero at init (the base model exactly); only A and B train."""

import logging
import math
import re

import torch
from torch import nn

# bitsandbytes warns at import (here or by transformers) that an optional CPU kernel package is missing:
# harmless, and confusing
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def bitsandbytes():
    """bitsandbytes, imported when a model is built: its import takes seconds that --help should not."""
    import bitsandbytes as bnb

    return bnb


class LoRALinear(nn.Module):
    def __init__(self, base, r=8, alpha=16, dropout=0.05):
        super().__init__()
        self.base, self.scaling = base, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        delta = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T
        return self.base(x) + (self.scaling * delta).to(x.dtype)


def add_lora(model, targets, r=8, alpha=16, dropout=0.05):
    """Freeze `model` and wrap every linear layer whose dotted name matches the regex `targets` -> their names."""
    freeze(model)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]  # 4-bit ones too
    names = [n for n in linear if re.search(targets, n)]
    if not names:
        raise ValueError(f"--lora_targets {targets!r} matches no linear layer of the model")
    for name in names:
        model.set_submodule(name, LoRALinear(model.get_submodule(name), r, alpha, dropout))
    return names


def freeze(model):
    """No gradient for any parameter of `model`, and its 4-bit layers ready to pass gradients to their input."""
    bnb = bitsandbytes()
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # On AVX512-BF16 CPUs an eval forward without grad repacks the weight for good: no input gradient after
            module.support_avx512bf16_for_cpu = False


def quantize_nf4(model, skip=()):
    """Every nn.Linear not under a dotted prefix in `skip` made a double-quantised NF4 Linear4bit, in place."""
    bnb = bitsandbytes()
    for name in [n for n, m in model.named_modules() if type(m) is nn.Linear]:
        linear = model.get_submodule(name)
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        weight = linear.weight.data
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=weight.dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q
        ).to(weight.device)  # .to() quantises
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        model.set_submodule(name, q)
    return model


def count_parameters(model):
    """Trainable and total parameters, a 4-bit weight counted by its elements, not by the bytes it is packed in."""
    bnb = bitsandbytes()
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if isinstance(p, bnb.nn.Params4bit) and p.quant_state:
            n = p.quant_state.shape.numel()  # its uint8 storage holds two values an element
        total += n
        trainable += n * p.requires_grad
    return dict(trainable=trainable, total=total, trainable_pct=100.0 * trainable / total)
