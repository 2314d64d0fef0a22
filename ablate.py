"""Controlled comparisons: which of text, audio and video carries the score, and which readout reads it best?

    python ablate.py --model tiny --data toy [--subsets t,a,tav] [--seeds 0,1,2]   # train each subset
    python ablate.py --test_time --ckpt runs/toy-disc-tav-s0                      # one model, inputs removed
    python ablate.py --model tiny --data toy --subsets tav --readouts gen0,gen,disc,mean   # each readout

The first trains and tests every modality subset with everything else fixed (seed, backbone, LoRA,
readout, data, epochs): how well can each subset predict the score? The second evaluates ONE checkpoint
trained on all its modalities with some removed at test time: how much does that model lean on each?
The third varies the readout instead (gen0: the generative readout zero-shot, untrained).
Any other flag is train.py's. A run whose folder already holds the metrics of the same config is reused,
not trained again, whatever the flags its readout never reads (Readout.unused_flags: gen has no head).
Writes ablation.md and ablation.json under --out.
"""
import argparse
import json
from pathlib import Path

import torch

from data import CheckpointError, DataError, make_loader
from eval import evaluate, load_checkpoint, seed_table, summarize
from lora import count_parameters
from readout import READOUTS, build
from train import parse_args, train

SUBSETS = ["t", "a", "v", "ta", "tv", "av", "tav"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subsets", default=",".join(SUBSETS), help="comma-separated modality subsets")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; cells are mean ± std over them")
    p.add_argument("--readouts", default=None, help="comma-separated readouts, gen0 for gen zero-shot (default: "
                                                     "--readout)")
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
        readouts = (args.readouts or base["readout"]).split(",")
        unknown = set(readouts) - set(READOUTS) - {"gen0"}
        if unknown:
            raise SystemExit(f"ablate.py: --readouts: unknown {', '.join(sorted(unknown))} (one of gen0, "
                             f"{', '.join(READOUTS)})")
        by_readout = args.readouts is not None
        name = "readouts" if by_readout else base["readout"]
        out = Path(args.out or f"runs/{Path(base['data'].replace(':', '')).name}-{name}-ablation")
        results = {}
        for readout in readouts:
            for subset in subsets:
                row = subset if not by_readout else readout if len(subsets) == 1 else f"{readout} {subset}"
                cfg = {**base, "readout": readout, "modalities": subset}
                if readout == "gen0":
                    run = {**cfg, "readout": "gen", "out": str(out / f"gen0-{subset}")}
                    results[row] = [finished(run) or zero_shot(run)]
                    continue
                results[row] = []
                for seed in map(int, args.seeds.split(",")):
                    run = {**cfg, "seed": seed, "out": str(out / (f"{readout}-{subset}-s{seed}" if by_readout else
                                                                  f"{subset}-s{seed}"))}
                    results[row].append(finished(run) or test_metrics(train(run)[1], run))
        title = (f"Trained and tested on each modality subset ({base['readout']}, {base['data']}, test split)"
                 if not by_readout else f"Each readout, everything else fixed ({base['data']}, test split)")

    by_readout = not args.test_time and args.readouts is not None
    extra = ("parse_fail_rate", "ms_per_clip", "trainable_pct") if by_readout else ()
    markdown = seed_table(title, results, "readout" if by_readout and len(subsets) == 1 else "modalities", extra)
    print(markdown)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(markdown + "\n")
    (out / "ablation.json").write_text(json.dumps(dict(title=title, results=results), indent=2))
    print(f"written: {out / 'ablation.md'}, {out / 'ablation.json'}")


def test_metrics(metrics, cfg):
    return {**metrics["test"], "trainable_pct": cfg["parameters"]["trainable_pct"]}


def finished(cfg):
    """The test metrics of a run already done with this very config in cfg['out'], else None."""
    folder = Path(cfg["out"])
    if not (folder / "metrics.json").exists() or not (folder / "config.json").exists():
        return None
    done = json.loads((folder / "config.json").read_text())
    ignored = {"out", "parameters", "resume", "cache_processed", *READOUTS[cfg["readout"]].unused_flags}
    if any(done.get(k) != v for k, v in cfg.items() if k not in ignored):
        return None
    print(f"reusing {folder} (its config.json is this run's)")
    return test_metrics(json.loads((folder / "metrics.json").read_text()), done)


def zero_shot(cfg):
    """The generative readout of the untrained model (no LoRA) on the test split, written to cfg['out'] as a
    run folder (config.json, metrics.json) -> its test metrics."""
    device = torch.device(cfg["device"])
    readout, processor = build(cfg, device, lora=False)
    cfg = {**cfg, "parameters": {**count_parameters(readout), "trainable": 0, "trainable_pct": 0.0}}
    metrics = {"test": summarize(*evaluate(readout, make_loader(cfg, "test", processor), device),
                                 cfg["parse_fallback"])}
    folder = Path(cfg["out"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return test_metrics(metrics, cfg)


if __name__ == "__main__":
    try:
        main()
    except (DataError, CheckpointError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}")
