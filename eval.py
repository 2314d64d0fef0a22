"""Evaluate a checkpoint: MMSA metrics, per-clip latency, and the train-mean baseline beside them.

    python eval.py --ckpt runs/toy300-disc-tav-s0 [--split test] [--out test.json]
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from data import data_root, make_loader, read_split, to_device
from readout import build

METRIC_KEYS = ("MAE", "Corr", "Acc2_has0", "F1_has0", "Acc2_non0", "F1_non0", "Acc5", "Acc7")


def _weighted_f1(truth, pred):
    """Support-weighted F1 over the classes present in `truth` (sklearn's average='weighted')."""
    f1 = 0.0
    for c in np.unique(truth):
        tp = np.sum((pred == c) & (truth == c))
        fp, fn = np.sum((pred == c) & (truth != c)), np.sum((pred != c) & (truth == c))
        f1 += np.mean(truth == c) * (2 * tp / (2 * tp + fp + fn))
    return float(f1)


def metrics(preds, labels):
    """Regression metrics with the MMSA framework's conventions (accuracies and F1 as fractions)."""
    p, y = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    out = dict(MAE=float(np.mean(np.abs(p - y))),
               Corr=float(np.corrcoef(p, y)[0, 1]) if p.std() > 0 and y.std() > 0 else float("nan"))
    out["Acc2_has0"] = float(np.mean((p >= 0) == (y >= 0)))               # negative vs non-negative
    out["F1_has0"] = _weighted_f1(y >= 0, p >= 0)
    nz = y != 0                                                           # label-0 clips dropped
    out["Acc2_non0"] = float(np.mean((p[nz] > 0) == (y[nz] > 0)))
    out["F1_non0"] = _weighted_f1(y[nz] > 0, p[nz] > 0)
    for k, bound in (("Acc5", 2), ("Acc7", 3)):                           # np.round: half to even
        out[k] = float(np.mean(np.round(np.clip(p, -bound, bound)) == np.round(np.clip(y, -bound, bound))))
    return out


@torch.no_grad()
def evaluate(readout, loader, device):
    """Predictions over a split -> (preds, labels, info). info['ms_per_clip'] excludes the first batch
    (warm-up) when there is more than one."""
    readout.eval()
    preds, labels, times, sizes, info = [], [], [], [], {}
    for batch in loader:
        batch = to_device(batch, device)
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            p, extra = readout.predict(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        sizes.append(len(p))
        preds.append(p.float().cpu())
        labels.append(batch["label"].cpu())
        for k, v in extra.items():
            info[k] = info.get(k, 0) + v
    timed = slice(1, None) if len(times) > 1 else slice(None)
    info["ms_per_clip"] = 1000 * sum(times[timed]) / sum(sizes[timed])
    return torch.cat(preds).numpy(), torch.cat(labels).numpy(), info


def mean_baseline(cfg, labels):
    """Metrics of always predicting the training-label mean."""
    train_mean = np.mean([r["label"] for r in read_split(data_root(cfg["data"]), "train")])
    return metrics(np.full(len(labels), train_mean), labels)


def format_table(rows):
    """rows: {name: metrics dict} -> a markdown table."""
    lines = ["| | " + " | ".join(METRIC_KEYS) + " |", "|---" * (len(METRIC_KEYS) + 1) + "|"]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in METRIC_KEYS) + " |")
    return "\n".join(lines)


def add_run_args(p):
    """The flags that define a run; train.py adds the optimisation ones."""
    p.add_argument("--model", default="Qwen/Qwen2.5-Omni-7B",
                   help="hub id or local transformers folder of a Qwen2.5-Omni model, or 'tiny' (random, offline)")
    p.add_argument("--quant", default="nf4", choices=["nf4", "none"], help="4-bit NF4 weights for the text decoder")
    p.add_argument("--data", default="mosi",
                   help="'toy' (generated; 'toy:N' for N clips), 'mosi', 'mosei' (under $MSA_DATA, default ./data) "
                        "or a path to an MMSA-layout folder")
    p.add_argument("--modalities", default="tav", help="any non-empty subset of 'tav': text, audio, video")
    p.add_argument("--readout", default="disc", help="how the score is read out: disc")
    p.add_argument("--head", default="linear", choices=["linear", "mlp"], help="disc: the regression head")
    p.add_argument("--pool_norm", default="none", choices=["none", "batch"],
                   help="disc: standardise the pooled state (batch statistics in training, training-set ones after)")
    p.add_argument("--loss", default="mse", choices=["mse", "l1"], help="disc: the regression loss")
    p.add_argument("--fps", type=float, default=2.0, help="video frames sampled per second")
    p.add_argument("--max_frames", type=int, default=32, help="at most this many frames per clip")
    p.add_argument("--max_pixels", type=int, default=128 * 28 * 28, help="frames are resized to fit this many pixels")
    p.add_argument("--cache_dir", default="cache", help="where decoded clips are kept between epochs and runs")
    p.add_argument("--eval_batch_size", type=int, default=8, help="clips per batch when evaluating")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--lora_targets", default=None, help="regex over module names (default: the text decoder's "
                                                         "q,k,v,o,gate,up,down projections)")
    p.add_argument("--lora_r", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora_alpha", type=float, default=32, help="LoRA scaling numerator (scale = alpha / r)")
    p.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA input")
    p.add_argument("--seed", type=int, default=0, help="seed of LoRA and head initialisation and data order")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    return p


def trained_state(readout):
    """What a checkpoint holds: the readout's own tensors and the LoRA ones, never the base weights."""
    return {k: v for k, v in readout.state_dict().items() if not k.startswith("backbone.") or "lora_" in k}


def load_checkpoint(ckpt, device):
    """(cfg, readout, processor) rebuilt from a checkpoint folder alone."""
    ckpt = Path(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    readout, processor = build(cfg, device)
    file = ckpt / "weights.safetensors"
    weights = load_file(file, device=str(device))
    expected = {n: tuple(t.shape) for n, t in trained_state(readout).items()}
    found = {n: tuple(t.shape) for n, t in weights.items()}
    if found != expected:
        wrong = sorted(n for n in expected.keys() | found.keys() if expected.get(n) != found.get(n))
        raise ValueError(f"{file}: does not fit the run its config.json describes ({len(wrong)} tensors missing, "
                         f"unexpected or of another shape, e.g. {wrong[0]}: {found.get(wrong[0])} in the file, "
                         f"{expected.get(wrong[0])} expected)")
    readout.load_state_dict(weights, strict=False)
    return cfg, readout, processor


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint folder written by train.py")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="split to evaluate")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    args = p.parse_args()
    device = torch.device(args.device)
    cfg, readout, processor = load_checkpoint(args.ckpt, device)
    preds, labels, info = evaluate(readout, make_loader(cfg, args.split, processor), device)
    result = dict(metrics(preds, labels), n=len(labels), **info)
    print(format_table({f"{cfg['readout']} ({args.split})": result,
                        f"train mean ({args.split})": mean_baseline(cfg, labels)}))
    print(f"n={len(labels)}  {info['ms_per_clip']:.1f} ms/clip")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
