"""Train a readout with QLoRA on a (4-bit) Qwen2.5-Omni Thinker; keep the epoch with the best validation MAE.

    python train.py --model tiny --data toy            # offline, a few minutes on CPU
    python train.py --readout disc --data mosi         # Qwen2.5-Omni-7B on $MSA_DATA/MOSI, one GPU

Writes a checkpoint folder (--out): config.json, weights.safetensors (LoRA and head only), log.jsonl,
metrics.json (valid and test of the kept epoch, and the train-mean baseline).
"""
import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data import DataError, make_loader, to_device
from eval import add_run_args, evaluate, mean_baseline, report, summarize, trained_state
from lora import count_parameters
from readout import build

# Defaults by backbone: a random tiny model needs many more steps at a larger rate than a pretrained 7B
# one. LoRA r=32 on the 7B Thinker trains 80.7 M of its 8.93 B parameters (0.90%). Flags given win.
PRESETS = {"tiny": dict(epochs=30, lr=2e-3, batch_size=8, grad_accum=1, lora_r=16),
           "pretrained": dict(epochs=5, lr=1e-4, batch_size=4, grad_accum=4, lora_r=32)}


def lr_at(step, total, warmup, peak):
    """Linear warm-up to `peak`, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(cfg):
    """Train the run `cfg` describes (a dict of every flag); returns (checkpoint folder, metrics)."""
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    device = torch.device(cfg["device"])
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    readout, processor = build(cfg, device)
    if cfg["grad_ckpt"]:
        readout.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in readout.parameters() if p.requires_grad]
    cfg["parameters"] = count_parameters(readout)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    print(f"trainable {cfg['parameters']['trainable']:,} of {cfg['parameters']['total']:,} parameters "
          f"({cfg['parameters']['trainable_pct']:.2f}%)")

    train_loader = make_loader(cfg, "train", processor, cfg["batch_size"], shuffle=True, seed=cfg["seed"],
                               drop_last=True)  # no tiny last batch: a batch norm in a readout needs two clips
    valid_loader, test_loader = make_loader(cfg, "valid", processor), make_loader(cfg, "test", processor)
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    total = cfg["epochs"] * math.ceil(len(train_loader) / cfg["grad_accum"])
    warmup = max(1, round(cfg["warmup_ratio"] * total))
    autocast = dict(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    prepare_loader = make_loader(cfg, "train", processor, cfg["batch_size"])  # in order, for Readout.prepare
    step, best, log = 0, float("inf"), open(out / "log.jsonl", "w")
    for epoch in range(cfg["epochs"]):
        readout.train()
        start, losses = time.time(), []
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg['epochs']}", leave=False, disable=None)
        for i, batch in enumerate(bar):
            with torch.autocast(**autocast):
                loss = readout.loss(to_device(batch, device))
            (loss / cfg["grad_accum"]).backward()
            losses.append(loss.item())
            if (i + 1) % cfg["grad_accum"] == 0 or i + 1 == len(train_loader):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total, warmup, cfg["lr"])
                torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        with torch.autocast(**autocast):
            readout.prepare(to_device(b, device) for b in prepare_loader)
        valid = summarize(*evaluate(readout, valid_loader, device), cfg["parse_fallback"])
        kept = valid["MAE"] < best
        if kept:
            best = valid["MAE"]
            save_file({k: v.detach().cpu().contiguous() for k, v in trained_state(readout).items()},
                      out / "weights.safetensors")
        record = dict(epoch=epoch + 1, step=step, lr=optimizer.param_groups[0]["lr"], train_loss=float(np.mean(losses)),
                      valid_MAE=valid["MAE"], valid_Corr=valid["Corr"], kept=kept, seconds=time.time() - start)
        unparsed = f"  unparseable {valid['parse_fail_rate']:.0%}" if "parse_fail_rate" in valid else ""
        if unparsed:
            record["valid_parse_fail_rate"] = valid["parse_fail_rate"]
        log.write(json.dumps(record) + "\n")
        log.flush()
        print(f"epoch {epoch + 1:3d}  loss {record['train_loss']:.4f}  valid MAE {valid['MAE']:.4f}  "
              f"Corr {valid['Corr']:.4f}{unparsed}{'  *' if kept else ''}  ({record['seconds']:.1f}s)")
    log.close()

    readout.load_state_dict(load_file(out / "weights.safetensors", device=str(device)), strict=False)  # kept epoch
    result = {}
    for split, loader in (("valid", valid_loader), ("test", test_loader)):
        preds, labels, info = evaluate(readout, loader, device)
        result[split] = summarize(preds, labels, info, cfg["parse_fallback"])
    result["test_mean_baseline"] = mean_baseline(cfg, labels)
    if device.type == "cuda":
        result["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    report(f"{cfg['readout']} (test)", result["test"], result["test_mean_baseline"])
    print(f"test MAE / train-mean MAE = {result['test']['MAE'] / result['test_mean_baseline']['MAE']:.3f}   "
          f"checkpoint: {out}")
    return out, result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    p.add_argument("--out", default=None,
                   help="checkpoint folder (default: runs/<data>-<readout>-<modalities>-s<seed>)")
    p.add_argument("--epochs", type=int, default=None, help="default: 30 for tiny, 5 otherwise")
    p.add_argument("--batch_size", type=int, default=None, help="clips per step (default: 8 tiny, 4 otherwise)")
    p.add_argument("--grad_accum", type=int, default=None, help="batches per optimizer step (default: 1 tiny, 4 else)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 2e-3 tiny, 1e-4 otherwise)")
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--warmup_ratio", type=float, default=0.1, help="share of steps with linear warm-up")
    p.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing (less memory, slower)")
    cfg = vars(p.parse_args(argv))
    preset = PRESETS["tiny" if cfg["model"] == "tiny" else "pretrained"]
    cfg.update({k: v for k, v in preset.items() if cfg[k] is None})
    cfg["lora_alpha"] = cfg["lora_alpha"] or 2.0 * cfg["lora_r"]
    if cfg["out"] is None:
        name = Path(cfg["data"].replace(":", "")).name
        cfg["out"] = f"runs/{name}-{cfg['readout']}-{cfg['modalities']}-s{cfg['seed']}"
    return cfg


if __name__ == "__main__":
    try:
        train(parse_args())
    except DataError as e:
        raise SystemExit(f"error: {e}")
