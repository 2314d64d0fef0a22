"""The Qwen2.5-Omni-7B and -3B Thinkers' parameter and LoRA counts, built on the meta device from their shapes:
no weights, any machine. Each size with the default targets and a linear head, then the paper's with its MLP head.

    python -m bench.params [--json params.json]
"""

import json
import re
from pathlib import Path

import torch
from transformers import Qwen2_5OmniThinkerForConditionalGeneration

from backbone import LORA_TARGETS, PAPER_TARGETS
from bench.common import SEVEN_B, SHAPES, command, run, thinker_config, tiny_processor


def param_counts(
    shape=SEVEN_B,
    ranks=(8, 16, 32, 64),
    targets=LORA_TARGETS["qwen2_5_omni_thinker"],
    head="linear",
):
    """The Qwen2.5-Omni-7B Thinker built on the meta device: parameters per part, LoRA parameters at each rank
    for the default targets, and the trainable share (LoRA + a linear head) under two conventions: real
    parameters, and packed storage elements (an NF4 weight of n parameters is n / 2 uint8 elements, which is
    what summing numel() over a loaded 4-bit model gives); and, the one reading we found that gives the paper's
    1.14%, LoRA alone over the text decoder's real parameters (embeddings and layers: no towers, no LM head)."""
    config = thinker_config(tiny_processor().tokenizer, **shape)
    with torch.device("meta"):
        model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    inner = model.model
    parts = {
        "text decoder (embeddings)": inner.language_model.embed_tokens,
        "text decoder (layers and norm)": None,
        "audio tower": inner.audio_tower,
        "vision tower": inner.visual,
        "LM head": model.lm_head,
    }
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items() if m is not None}
    language = sum(p.numel() for p in inner.language_model.parameters())
    counts["text decoder (layers and norm)"] = language - counts["text decoder (embeddings)"]
    total = sum(p.numel() for p in model.parameters())
    # Quantised: every linear layer outside the towers and the LM head (readout.SKIP_QUANT).
    quantised = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and not re.match(r"(model\.(audio_tower|visual)|lm_head)", n)
    )
    targets_in_out = [
        (m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and re.search(targets, n)
    ]
    hidden = config.text_config.hidden_size
    size = hidden + 1
    if head == "mlp":  # LayerNorm, hidden -> 256, 256 -> 1
        size = 2 * hidden + (hidden + 1) * 256 + 257
    rows = []
    for r in ranks:
        lora = sum(r * (i + o) for i, o in targets_in_out)
        rows.append(
            dict(
                rank=r,
                lora=lora,
                trainable=lora + size,
                pct_real=100 * (lora + size) / (total + lora + size),
                pct_packed=100 * (lora + size) / (total - quantised // 2 + lora + size),
                pct_of_text_decoder=100 * lora / language,
            )
        )
    return dict(
        parts=counts,
        total=total,
        quantised_linear=quantised,
        lora_layers=len(targets_in_out),
        ranks=rows,
    )


def params_table(c):
    lines = ["| part | parameters |", "|---|---|"] + [
        f"| {k} | {v:,} |" for k, v in c["parts"].items()
    ]
    lines += [
        f"| **total** | **{c['total']:,}** |",
        "",
        f"LoRA on the {c['lora_layers']} target layers, plus the head "
        f"({c['ranks'][0]['trainable'] - c['ranks'][0]['lora']:,}):",
        "",
        "| rank | LoRA parameters | trainable % (real parameters) | trainable % (packed 4-bit elements) "
        "| LoRA % of the text decoder |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['rank']} | {r['lora']:,} | {r['pct_real']:.2f} | {r['pct_packed']:.2f} | "
        f"{r['pct_of_text_decoder']:.2f} |"
        for r in c["ranks"]
    ]
    return "\n".join(lines)


def main(argv=None):
    cmd = command(__doc__)
    cfg = cmd.settings(cmd.parse(argv))
    result = {}
    for size, shape in SHAPES.items():
        result[size] = dict(
            default=param_counts(shape),
            paper=param_counts(shape, targets=PAPER_TARGETS, head="mlp"),
        )
        for name, counts in result[size].items():
            where = "the text decoder" if name == "default" else "matched anywhere"
            print(f"\n{size}, {name} targets ({where}):")
            print(params_table(counts))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    run(main)
