"""Modality ablation: which of text, audio and video carries the score?

    python ablate.py --model tiny --data toy [--subsets t,a,tav] [--seeds 0,1,2]   # train each subset
    python ablate.py --test_time --ckpt runs/toy-disc-tav-s0                      # one model, inputs removed

The first trains and tests every modality subset with everything else fixed (seed, backbone, LoRA,
readout, data, epochs): how well can each subset predict the score? The second evaluates ONE checkpoint
trained on all its modalities with some removed at test time: how much does that model lean on each?
Any other flag is train.py's. Writes ablation.md and ablation.json under --out.
"""
import argparse
import json
from pathlib import Path

import torch

from data import CheckpointError, DataError, make_loader
from eval import evaluate, load_checkpoint, seed_table, summarize
from train import parse_args, train

SUBSETS = ["t", "a", "v", "ta", "tv", "av", "tav"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subsets", default=",".join(SUBSETS), help="comma-separated modality subsets")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; cells are mean ± std over them")
    p.add_argument("--test_time", action="store_true", help="evaluate --ckpt with modalities removed at test time")
    p.add_argument("--ckpt", default=None, help="--test_time: a checkpoint folder written by train.py")
    p.add_argument("--out", default=None, help="folder for the runs and the table "
                                               "(default: runs/<data>-<readout>-ablation, or under --ckpt)")
    args, rest = p.parse_known_args()
    subsets = args.subsets.split(",")

    if args.test_time:
        if not args.ckpt:
            raise SystemExit("ablate.py: --test_time needs --ckpt")
        device = torch.device(parse_args(rest)["device"])
        cfg, readout, processor = load_checkpoint(args.ckpt, device)
        subsets = [s for s in subsets if set(s) <= set(cfg["modalities"])]
        results = {s: [summarize(*evaluate(readout, make_loader({**cfg, "modalities": s}, "test", processor), device),
                                 cfg["parse_fallback"])] for s in subsets}
        title = (f"One {cfg['readout']} model trained on '{cfg['modalities']}' ({args.ckpt}), "
                 "tested with only these modalities")
        out = Path(args.out or Path(args.ckpt) / "ablation_test_time")
    else:
        base = parse_args(rest)
        out = Path(args.out or f"runs/{Path(base['data'].replace(':', '')).name}-{base['readout']}-ablation")
        results = {}
        for subset in subsets:
            results[subset] = []
            for seed in map(int, args.seeds.split(",")):
                cfg = {**base, "modalities": subset, "seed": seed, "out": str(out / f"{subset}-s{seed}")}
                results[subset].append(train(cfg)[1]["test"])
        title = f"Trained and tested on each modality subset ({base['readout']}, {base['data']}, test split)"

    markdown = seed_table(title, results, "modalities")
    print(markdown)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(markdown + "\n")
    (out / "ablation.json").write_text(json.dumps(dict(title=title, results=results), indent=2))
    print(f"written: {out / 'ablation.md'}, {out / 'ablation.json'}")


if __name__ == "__main__":
    try:
        main()
    except (DataError, CheckpointError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}")
