"""Evaluate a checkpoint, or a model zero-shot: MMSA metrics, ms per clip, and the train-mean baseline.

    python eval.py --ckpt runs/toy-disc-tav-s0 [--split test] [--out test.json]
    python eval.py --model tiny --data toy --readout gen          # zero-shot: no training, no LoRA
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from data import DataError, data_root, make_loader, read_split, to_device
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
               Corr=float(np.corrcoef(p, y)[0, 1]) if np.ptp(p) > 0 and np.ptp(y) > 0 else float("nan"))
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


def summarize(preds, labels, info, fallback=0.0):
    """Headline metrics, an unanswered clip (NaN) scored as `fallback`, with n and ms per clip; for a
    readout that can fail to answer, the parse failures and the metrics over the answered clips alone."""
    failed = np.isnan(preds)
    out = dict(metrics(np.where(failed, fallback, preds), labels), n=len(labels), ms_per_clip=info["ms_per_clip"])
    if "parse_failures" in info:
        out.update(parse_failures=int(failed.sum()), parse_fail_rate=float(failed.mean()),
                   tokens_per_clip=info["generated_tokens"] / len(labels),
                   parsed=metrics(preds[~failed], labels[~failed]) if (~failed).sum() > 1 else None)
    return out


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
    p.add_argument("--readout", default="disc", help="how the score is read out: disc (regression head on the "
                                                      "last token's hidden state) or gen (generated text, parsed)")
    p.add_argument("--head", default="linear", choices=["linear", "mlp"], help="disc: the regression head")
    p.add_argument("--pool_norm", default="none", choices=["none", "batch"],
                   help="disc: standardise the pooled state (batch statistics in training, training-set ones after)")
    p.add_argument("--loss", default="mse", choices=["mse", "l1"], help="disc: the regression loss")
    p.add_argument("--max_new_tokens", type=int, default=8, help="gen: greedy decoding stops after this many tokens")
    p.add_argument("--parse_fallback", type=float, default=0.0,
                   help="gen: the score given to an unparseable answer in the headline metrics (0.0: neutral)")
    p.add_argument("--fps", type=float, default=2.0, help="video frames sampled per second")
    p.add_argument("--max_frames", type=int, default=32, help="at most this many frames per clip")
    p.add_argument("--max_pixels", type=int, default=128 * 28 * 28, help="frames are resized to fit this many pixels")
    p.add_argument("--on_missing", default="error", choices=["error", "skip"],
                   help="a clip without the file a requested modality needs: stop with an error, or skip and count it")
    p.add_argument("--cache_dir", default="cache", help="where decoded clips are kept between epochs and runs")
    p.add_argument("--eval_batch_size", type=int, default=8, help="clips per batch when evaluating")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--lora_targets", default=None, help="regex over module names (default: the text decoder's "
                                                         "q,k,v,o,gate,up,down projections)")
    p.add_argument("--lora_r", type=int, default=None,
                   help="LoRA rank (default: 32, about 0.9%% of the 7B Thinker's parameters; 16 for tiny)")
    p.add_argument("--lora_alpha", type=float, default=None, help="LoRA scale numerator, scale = alpha / r "
                                                                  "(default: 2 r)")
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


def report(name, result, baseline=None):
    """Print a result of summarize() as a table, with the parse counts of a generative readout."""
    rows = {name: result}
    if result.get("parsed"):
        rows[f"{name}, answered clips only"] = result["parsed"]
    if baseline:
        rows["train mean"] = baseline
    print(format_table(rows))
    line = f"n={result['n']}  {result['ms_per_clip']:.1f} ms/clip"
    if "parse_failures" in result:
        line += (f"  unparseable {result['parse_failures']} ({100 * result['parse_fail_rate']:.1f}%, scored as "
                 f"the fallback)  {result['tokens_per_clip']:.1f} generated tokens/clip")
    print(line)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="checkpoint folder written by train.py; its config.json then "
                                                "defines the run and the run flags below are ignored, but --device")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="split to evaluate")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    add_run_args(p)
    args = p.parse_args()
    device = torch.device(args.device)
    if args.ckpt:
        cfg, readout, processor = load_checkpoint(args.ckpt, device)
        name = f"{cfg['readout']} ({args.split})"
    elif args.readout == "disc":
        raise SystemExit("eval.py: the disc readout's head is trained: pass --ckpt (zero-shot is for --readout gen)")
    else:  # zero-shot: the untrained model, no LoRA
        cfg = vars(args)
        readout, processor = build(cfg, device, lora=False)
        name = f"{cfg['readout']} zero-shot ({args.split})"
    preds, labels, info = evaluate(readout, make_loader(cfg, args.split, processor), device)
    result = summarize(preds, labels, info, cfg["parse_fallback"])
    report(name, result, mean_baseline(cfg, labels))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        raise SystemExit(f"error: {e}")
