"""Controlled comparisons, everything else fixed: which modalities carry the score, which readout reads it best?

    python ablate.py --model tiny --data toy [--subsets t,a,tav] [--seeds 0,1,2]   # train and test each subset
    python ablate.py --model tiny --data toy --subsets tav --readouts gen0,gen,gen@expected,disc   # each readout

Other flags are train.py's; finished runs are reused. ONE model without some modalities: eval.py --modalities.
"""

import argparse
import json
from pathlib import Path

from data import UserError
from eval import Help, run_config, run_split, save_json, table
from readout import DECODE, READOUTS
from train import parse_args, train


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    p.add_argument(
        "--subsets", default="t,a,v,ta,tv,av,tav", help="comma-separated modality subsets"
    )
    p.add_argument(
        "--seeds", default="0", help="comma-separated seeds: cells are mean ± std over them"
    )
    p.add_argument(
        "--readouts",
        default=None,
        help="comma-separated readouts; gen0: gen zero-shot; gen@RULE, "
        "gen0@RULE: read with another --decode rule (default: --readout alone, a row per subset)",
    )
    p.add_argument(
        "--out", help="the folder of the runs and the table (default: runs/DATA-READOUT-ablation)"
    )
    args, rest = p.parse_known_args(argv)
    base = parse_args(rest)
    readouts, subsets = (args.readouts or base["readout"]).split(","), args.subsets.split(",")
    if any(
        r.partition("@")[0] not in {*READOUTS, "gen0"} or r.partition("@")[2] not in {"", *DECODE}
        for r in readouts
    ):
        raise UserError(
            f"--readouts {args.readouts}: each of {', '.join(READOUTS)}, gen0, or gen@RULE, gen0@RULE with "
            f"RULE one of {', '.join(DECODE)}"
        )
    name = "readouts" if args.readouts else base["readout"]
    out = Path(args.out or f"runs/{Path(base['data'].replace(':', '')).name}-{name}-ablation")
    rows = {}
    for readout in readouts:
        kind, _, rule = readout.partition(
            "@"
        )  # gen@expected: the gen runs, read with another decoding rule
        for subset in subsets:
            row = (
                subset
                if not args.readouts
                else readout
                if len(subsets) == 1
                else f"{readout} {subset}"
            )
            cfg = {**base, "readout": "gen" if kind == "gen0" else kind, "modalities": subset}
            if kind == "gen0":  # the untrained model
                rows[row] = [
                    evaluated(
                        out / f"{readout}-{subset}.json", {**cfg, "decode": rule or cfg["decode"]}
                    )
                ]
                continue
            rows[row] = []
            for seed in map(int, args.seeds.split(",")):
                folder = f"{kind}-{subset}-s{seed}" if args.readouts else f"{subset}-s{seed}"
                run = {**cfg, "seed": seed, "out": str(out / folder)}
                result = finished(run) or train(run)[1]["test"]
                if rule:  # the trained run, read with another decoding rule
                    result = evaluated(
                        out / folder / f"test@{rule}.json", {**run, "decode": rule}, run["out"]
                    )
                rows[row].append(result)
    title = f"Each {'readout' if args.readouts else 'modality subset'}, everything else fixed ({base['data']}, test)"
    gen_columns = ("parse_fail_rate", "ms_per_clip") if args.readouts else ()
    columns = ("MAE", "Corr", "Acc2_non0", "F1_non0", "Acc7") + gen_columns
    markdown = f"**{title}**\n\n" + table(
        rows, columns, "readout" if args.readouts else "modalities"
    )
    print(markdown)
    save_json(out / "ablation.json", dict(title=title, results=rows))
    (out / "ablation.md").write_text(markdown + "\n")
    print(f"written: {out / 'ablation.md'}, {out / 'ablation.json'}")


def finished(cfg):
    """The test metrics of a run already done in cfg['out'] with the same run settings, else None."""
    folder = Path(cfg["out"])
    if not (folder / "metrics.json").exists() or not (folder / "config.json").exists():
        return None
    unused = READOUTS[cfg["readout"]].unused_flags
    done, wanted = (
        ({k: v for k, v in c.items() if k not in unused})
        for c in (json.loads((folder / "config.json").read_text()), run_config(cfg))
    )
    if done != wanted:
        return None
    print(f"reusing {folder} (its config.json is this run's)")
    return json.loads((folder / "metrics.json").read_text())["test"]


def evaluated(file, cfg, folder=None):
    """The test metrics of the run in `folder` read with cfg's decoding rule (no folder: gen zero-shot), kept in
    `file` with the run settings they come from, and computed again when these differ."""
    settings = run_config(cfg)
    if file.exists() and json.loads(file.read_text())["settings"] == settings:
        print(f"reusing {file}")
    else:
        test = run_split(
            folder, {**cfg, "split": "test", "bootstrap": 0, "plot": False}, given={"decode"}
        )[2]
        save_json(file, dict(settings=settings, test=test))
    return json.loads(file.read_text())["test"]


if __name__ == "__main__":
    try:
        main()
    except (UserError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None
