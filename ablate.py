"""Controlled comparisons, everything else fixed: which modalities carry the score, which readout reads it best?

    python ablate.py --model tiny --data toy [--modalities t,a,tav] [--seeds 0,1,2]   # train and test each subset
    python ablate.py --model tiny --data toy --readouts gen0,gen,gen@expected,disc   # each readout

--modalities: comma-separated subsets, a row each (default: every subset of tav; with --readouts: tav)

The other flags are train.py's. Each run has its folder, named by its readout, modalities, seed and a hash of
its run settings: a finished run is reused, a stopped one continued, and other settings never train into it.
Each comparison's table (ablation_READOUTS_SUBSETS_sSEEDS.md and .json) has a row for the train-mean baseline. ONE model without some modalities: eval.py --modalities.
"""

import json
from pathlib import Path

from data import read_split
from eval import mean_baseline, run_split, table
from readout import DECODE, READOUTS
from runs import save_json
from settings import Setting, Settings, grouped, settings_key
from train import command, run_folder, train
from util import UserError

SUBSETS = "t,a,v,ta,tv,av,tav"


def numbers(text):
    return [int(n) for n in text.split(",")]


# ablate.py's own settings: what it compares
COMPARISON = grouped(
    "the comparison",
    Setting(
        "out",
        str,
        None,
        "the folder of the runs and the table (default: runs/DATA-READOUT-ablation)",
    ),
    Setting("seeds", numbers, [0], "comma-separated seeds: cells are mean ± std over them"),
    Setting(
        "readouts",
        str,
        None,
        "comma-separated readouts; gen0: gen zero-shot; gen@RULE, gen0@RULE: read with another "
        "--decode rule (default: --readout, a row per subset)",
    ),
)


def settings_from(argv=None):
    """-> (the base run's settings, the comparison's: subsets, seeds and readouts as lists, out)."""
    cmd = command(argv, COMPARISON, __doc__)
    given = cmd.parse(argv)
    base = cmd.settings(given)
    # each run is trained anew, or continued where it stopped: never one of the command line's
    base = Settings(**vars(base), resume=None, overwrite=False)
    by_readout = base.readouts is not None
    readouts = (base.readouts or base.readout).split(",")
    check_readouts(readouts)
    subsets = base.modalities if by_readout or "modalities" in given else SUBSETS
    name = "readouts" if by_readout else base.readout
    data = Path(base.data.replace(":", "")).name
    out = Path(base.out or f"runs/{data}-{name}-ablation")
    return base, dict(
        by_readout=by_readout,
        readouts=readouts,
        subsets=subsets.split(","),
        seeds=base.seeds,
        out=out,
    )


def main(argv=None):
    base, args = settings_from(argv)
    by_readout, out = args["by_readout"], args["out"]
    rows = {}
    for readout in args["readouts"]:
        kind, _, rule = readout.partition("@")  # gen@expected: the gen runs, read another way
        for subset in args["subsets"]:
            row = subset
            if by_readout:
                row = readout if len(args["subsets"]) == 1 else f"{readout} {subset}"
            cfg = base.but(readout="gen" if kind == "gen0" else kind, modalities=subset)
            if kind == "gen0":  # the untrained model
                rows[row] = [
                    evaluated(out / f"{readout}-{subset}.json", cfg.but(decode=rule or cfg.decode))
                ]
                continue
            rows[row] = []
            for seed in args["seeds"]:
                folder = folder_name(cfg.but(seed=seed), by_readout)
                run = cfg.but(seed=seed, out=str(out / folder))
                result = trained(run)
                print(f"run: {run.out}")
                if rule:  # the trained run, read with another decoding rule
                    file = out / folder / f"test@{rule}.json"
                    result = evaluated(file, run.but(decode=rule), run.out)
                rows[row].append(result)
    write_table(base, args, rows)


def write_table(base, args, rows):
    """The comparison's table with the train-mean baseline's row, printed and written under its own name."""
    by_readout, out = args["by_readout"], args["out"]
    what = "readout" if by_readout else "modality subset"
    title = f"Each {what}, everything else fixed ({base.data}, test)"
    columns = ("MAE", "Corr", "Acc2_non0", "F1_non0", "Acc7")
    if by_readout:
        columns += ("parse_fail_rate", "ms_per_clip")
    labels = [r["label"] for r in read_split(base, "test")[0]]
    rows["train mean"] = [mean_baseline(base, labels)]
    markdown = f"**{title}**\n\n" + table(rows, columns, "readout" if by_readout else "modalities")
    print(markdown)
    # named by what it compares: another comparison writes beside it
    seeds = "-".join(map(str, args["seeds"]))
    compared = f"{'+'.join(args['readouts'])}_{'+'.join(args['subsets'])}"
    name = f"ablation_{compared}_s{seeds}"
    save_json(out / f"{name}.json", dict(title=title, results=rows))
    (out / f"{name}.md").write_text(markdown + "\n")
    print(f"written: {out / name}.md, {out / name}.json")


def check_readouts(readouts):
    for r in readouts:
        kind, _, rule = r.partition("@")
        if kind not in {*READOUTS, "gen0"} or rule not in {"", *DECODE}:
            raise UserError(
                f"--readouts: {r!r} is not one of {', '.join(READOUTS)}, gen0, or gen@RULE, gen0@RULE with "
                f"RULE one of {', '.join(DECODE)}"
            )


def trained(cfg):
    """The test metrics of the run cfg describes, in cfg.out: reused if it is done there, continued if it
    was stopped, trained if there is none."""
    folder = Path(cfg.out)
    if (folder / "metrics.json").exists():
        print(f"reusing {folder} (the same run settings)")
        return json.loads((folder / "metrics.json").read_text())["test"]
    if (folder / "last.safetensors").exists():
        print(f"continuing {folder} (stopped before it finished)")
        return train(cfg.but(resume=cfg.out))[1]["test"]
    return train(cfg)[1]["test"]


def folder_name(run, by_readout):
    """[READOUT-]MODALITIES-sSEED-HASH, the hash that of the run's settings: other settings, another folder."""
    name = run_folder(run)
    return name if by_readout else name.partition("-")[2]


def evaluated(file, cfg, folder=None):
    """The test metrics of the run in `folder` read with cfg's decoding rule (no folder: gen zero-shot),
    kept in `file` with the run settings they come from, and computed again when these differ."""
    settings = settings_key(cfg, READOUTS[cfg.readout])
    if file.exists() and json.loads(file.read_text())["settings"] == settings:
        print(f"reusing {file}")
    else:
        test = run_split(cfg, folder).result
        save_json(file, dict(settings=settings, test=test))
    return json.loads(file.read_text())["test"]


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
