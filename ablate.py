"""Controlled comparisons, everything else fixed: which modalities carry the score, which readout reads it best?

    python ablate.py --model tiny --data toy [--subsets t,a,tav] [--seeds 0,1,2]   # train and test each subset
    python ablate.py --model tiny --data toy --subsets tav --readouts gen0,gen,disc,mean   # each readout

Other flags are train.py's. A finished run with the same run settings is reused (gen0: gen zero-shot). To test
ONE model with modalities left out instead: eval.py --ckpt RUN --modalities t (or a, ta, ...).
"""
import argparse
import json
from pathlib import Path

import torch

from data import UserError, load_clips, make_loader
from eval import Help, evaluate, run_config, save_json, table
from lora import count_parameters
from readout import READOUTS, build
from train import parse_args, train

COLUMNS = ("MAE", "Corr", "Acc2_non0", "F1_non0", "Acc7")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    p.add_argument("--subsets", default="t,a,v,ta,tv,av,tav", help="comma-separated modality subsets")
    p.add_argument("--seeds", default="0", help="comma-separated seeds: cells are mean ± std over them")
    p.add_argument("--readouts", default=None, help="comma-separated readouts, gen0 for gen zero-shot (default: "
                                                     "--readout alone, a row per subset)")
    p.add_argument("--out", default=None, help="folder of the runs and the table "
                                               "(default: runs/<data>-<readout, or 'readouts'>-ablation)")
    args, rest = p.parse_known_args(argv)
    base = parse_args(rest)
    readouts, subsets = (args.readouts or base["readout"]).split(","), args.subsets.split(",")
    unknown = set(readouts) - set(READOUTS) - {"gen0"}
    if unknown:
        raise UserError(f"--readouts: unknown {', '.join(sorted(unknown))} (one of gen0, {', '.join(READOUTS)})")
    name = "readouts" if args.readouts else base["readout"]
    out = Path(args.out or f"runs/{Path(base['data'].replace(':', '')).name}-{name}-ablation")
    rows = {}
    for readout in readouts:
        for subset in subsets:
            row = subset if not args.readouts else readout if len(subsets) == 1 else f"{readout} {subset}"
            cfg = {**base, "readout": readout, "modalities": subset}
            if readout == "gen0":
                run = {**cfg, "readout": "gen", "out": str(out / f"gen0-{subset}")}
                rows[row] = [finished(run) or zero_shot(run)]
                continue
            rows[row] = []
            for seed in map(int, args.seeds.split(",")):
                folder = f"{readout}-{subset}-s{seed}" if args.readouts else f"{subset}-s{seed}"
                run = {**cfg, "seed": seed, "out": str(out / folder)}
                rows[row].append(finished(run) or test_metrics(train(run)[1]))
    title = f"Each {'readout' if args.readouts else 'modality subset'}, everything else fixed ({base['data']}, test)"
    columns = COLUMNS + (("parse_fail_rate", "ms_per_clip", "trainable_pct") if args.readouts else ())
    markdown = f"**{title}**\n\n" + table(rows, columns, "readout" if args.readouts else "modalities")
    print(markdown)
    save_json(out / "ablation.json", dict(title=title, results=rows))
    (out / "ablation.md").write_text(markdown + "\n")
    print(f"written: {out / 'ablation.md'}, {out / 'ablation.json'}")


def test_metrics(metrics):
    return {**metrics["test"], "trainable_pct": metrics["parameters"]["trainable_pct"]}


def finished(cfg):
    """The test metrics of a run already done in cfg['out'] with the same run settings, else None."""
    folder = Path(cfg["out"])
    if not (folder / "metrics.json").exists() or not (folder / "config.json").exists():
        return None
    unused = READOUTS[cfg["readout"]].unused_flags
    done, wanted = (({k: v for k, v in c.items() if k not in unused})
                    for c in (json.loads((folder / "config.json").read_text()), run_config(cfg)))
    if done != wanted:
        return None
    print(f"reusing {folder} (its config.json is this run's)")
    return test_metrics(json.loads((folder / "metrics.json").read_text()))


def zero_shot(cfg):
    """The generative readout of the untrained model (no LoRA) on the test split, written to cfg['out'] as a run
    folder (config.json, metrics.json) -> its test metrics."""
    device = torch.device(cfg["device"])
    readout, processor = build(cfg, device, lora=False)
    loader = make_loader(cfg, load_clips(cfg, "test"), processor)
    metrics = dict(test=evaluate(readout, loader, device, cfg["parse_fallback"])[0],
                   parameters={**count_parameters(readout), "trainable": 0, "trainable_pct": 0.0})
    save_json(Path(cfg["out"]) / "config.json", run_config(cfg))
    save_json(Path(cfg["out"]) / "metrics.json", metrics)
    return test_metrics(metrics)


if __name__ == "__main__":
    try:
        main()
    except (UserError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}")
