"""LoRA by hand: one layer over `nn.Linear` or bitsandbytes' `Linear4bit`, and the helpers around it.

y = base(x) + (alpha / r) * B(A(dropout(x))), with B zero-initialised so that the model equals its base
at init. The base stays frozen (and 4-bit where it was); only A and B train.
"""
import logging
import math
import re

import torch
from torch import nn

# bitsandbytes warns at import that an optional CPU kernel package is missing: harmless, and confusing.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
import bitsandbytes as bnb  # noqa: E402

# The text decoder's attention and MLP projections; the audio and vision towers keep their weights.
DEFAULT_TARGETS = r"language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"


class LoRALinear(nn.Module):
    def __init__(self, base, r=8, alpha=16, dropout=0.05):
        super().__init__()
        self.base, self.scaling = base, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        delta = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T
        return self.base(x) + (self.scaling * delta).to(x.dtype)


def add_lora(model, targets=DEFAULT_TARGETS, r=8, alpha=16, dropout=0.05):
    """Freeze `model` and wrap every linear layer whose dotted name matches the regex `targets`.
    Returns the wrapped names; an empty match is an error, not a silent no-op."""
    freeze(model)
    names = [n for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, bnb.nn.Linear4bit)) and re.search(targets, n)]
    if not names:
        raise ValueError(f"--lora_targets {targets!r} matches no linear layer of the model")
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        base = getattr(owner, child)
        layer = LoRALinear(base, r, alpha, dropout)
        setattr(owner, child, layer.to(base.weight.device))
    return names


def freeze(model):
    """No gradient for any parameter of `model`, and its 4-bit layers ready to pass gradients to their input."""
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # On AVX512-BF16 CPUs, an eval-mode forward without grad repacks the 4-bit weight for good,
            # after which no gradient reaches the input (so none reaches LoRA layers upstream).
            module.support_avx512bf16_for_cpu = False


def lora_state_dict(model):
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def merge_lora(model):
    """Replace every LoRALinear by one plain float `nn.Linear` holding base + delta (4-bit bases are
    dequantised first): for deployment or export, not for further QLoRA training."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        base = module.base
        if isinstance(base, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        else:
            weight = base.weight.data.float()
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=weight.device)
        merged.weight.data = weight + module.scaling * module.lora_B.float() @ module.lora_A.float()
        if base.bias is not None:
            merged.bias.data = base.bias.data.float()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, merged)
    return model


def count_parameters(model):
    """Trainable and total parameters, a 4-bit weight counted by its real element count, not by the
    bytes it is packed into (two weights per byte)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.quant_state.shape.numel() if isinstance(p, bnb.nn.Params4bit) and p.quant_state else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return dict(trainable=trainable, total=total, trainable_pct=100.0 * trainable / total)
