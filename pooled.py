"""Statistics of runs' predictions. --bootstrap N: one run's metrics with 95% percentile intervals from N
resamplings of its clips. --plot: one run's figures (its predictions against the labels, named by what was read,
e.g. gen@expected-t-test_scatter.png, and for a trained run its learning curve with the train mean's line). --compare: two runs on the same clips, side by side, and d = |error
of A| - |error of B| clip by clip (a bootstrap 95% interval, a paired permutation test); it takes eval.py's flags
(a run flag given replaces both runs' own, e.g. --decode; --target: one target of several). Given such files,
one statement over several comparisons of the same two readouts, one a seed: the mean difference of absolute
errors over all of them, with a 95% interval that accounts for both the seeds and the clips, and how many
comparisons on their own put each side significantly ahead (p < 0.05).

    python pooled.py --bootstrap 1000 --ckpt runs/toy-disc-tav-s0-HASH [--json test.json]
    python pooled.py --plot --ckpt runs/toy-disc-tav-s0-HASH [--modalities t]    # figures, into the run's folder
    python pooled.py --compare DISC_S0 GEN_S0 --decode expected --json compare-s0.json   # and so on, per seed
    python pooled.py compare-s0.json compare-s1.json compare-s2.json [--json pooled.json]

The interval: a bootstrap that draws the seeds with replacement and the clips with replacement, the same clips
for every seed drawn (a clip that is hard for one seed's runs is hard for the others'). With three seeds the
seed level is coarse; the interval is no narrower than the seeds' disagreement allows.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from data import read_split
from eval import checkpoint_settings, command, mean_baseline, metrics, run_split, scoring, table
from readout import READOUTS
from runs import load_config, read_log, read_tensors, save_json
from util import UserError


def paired(preds_a, preds_b, labels, n=10000, seed=0):
    """A against B on the same clips: d = |error of A| - |error of B| per clip (averaged over targets), its mean with
    a bootstrap 95% interval, a two-sided paired permutation test (each clip's sign flipped at random n times),
    who is closer how often, and d."""
    errors = np.abs(preds_a - labels) - np.abs(preds_b - labels)
    d = errors.reshape(len(labels), -1).mean(1)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (n, len(d)))].mean(1)
    null = np.abs((rng.choice([-1.0, 1.0], (n, len(d))) * d).mean(1))
    return dict(
        mean_abs_error_diff=float(d.mean()),
        ci95=[float(np.percentile(means, q)) for q in (2.5, 97.5)],
        p_value=float((1 + np.sum(null >= abs(d.mean()) - 1e-12)) / (n + 1)),
        permutations=n,
        a_closer=float(np.mean(d < 0)),
        b_closer=float(np.mean(d > 0)),
        per_clip=d.tolist(),  # for statistics over several comparisons (pooled.py)
    )


def compare(a, b, folders, split):
    """Two runs' predictions on the same clips, side by side and tested clip by clip."""
    if a.ids != b.ids or not np.array_equal(a.labels, b.labels):
        raise UserError(
            f"--compare: {folders[0]} ({a.cfg.data}, {len(a.ids)} clips) and {folders[1]} "
            f"({b.cfg.data}, {len(b.ids)} clips) are not evaluated on the same clips of {split!r}"
        )
    print(table({f"A: {a.name}": [a.result], f"B: {b.name}": [b.result]}))
    c = paired(a.preds, b.preds, a.labels)
    print(
        f"paired over {len(a.ids)} clips, |error of A| - |error of B|: mean {c['mean_abs_error_diff']:+.4f}, "
        f"95% bootstrap CI [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]; permutation test p = "
        f"{c['p_value']:.4f} ({c['permutations']} sign flips); A closer on {c['a_closer']:.1%} of clips, "
        f"B on {c['b_closer']:.1%}"
    )
    return dict(
        a=a.result, b=b.result, paired=c, checkpoints=folders, names=[a.name, b.name], ids=a.ids
    )


def bootstrap(preds, labels, n=1000, seed=0, keys=("MAE", "Corr", "Acc2_non0", "Acc7"), **task):
    """95% percentile intervals of the metrics `keys` (those the task has) over `n` resamplings of the clips
    with replacement; `task`: metrics()'s keyword arguments."""
    idx = np.random.default_rng(seed).integers(0, len(labels), (n, len(labels)))
    samples = [metrics(preds[i], labels[i], **task) for i in idx]
    kept = [k for k in keys if k in samples[0]]
    return {
        k: [float(np.nanpercentile([s[k] for s in samples], q)) for q in (2.5, 97.5)] for k in kept
    }


def intervals(argv):
    """pooled.py --bootstrap N --ckpt RUN, with eval.py's flags -> the run's metrics with their intervals."""
    cmd = command(argv, __doc__)
    cmd.parser.add_argument(
        "--bootstrap", type=int, required=True, metavar="N", help="resamplings of the clips"
    )
    given = cmd.parse(argv)
    cfg = checkpoint_settings(cmd, given, given.get("ckpt"))
    scored = run_split(cfg, cfg.ckpt, cfg.split, cfg.target)
    ci = bootstrap(scored.preds, scored.labels, given["bootstrap"], **scoring(scored.cfg))
    result = dict(scored.result, ci95=ci)
    print(table({scored.name: [result]}))
    print("95% intervals: " + ", ".join(f"{k} [{lo:.3f}, {hi:.3f}]" for k, (lo, hi) in ci.items()))
    if cfg.json:
        save_json(Path(cfg.json), result)
    return result


def draw(scored, folder):
    """PNGs in `folder`, their paths printed: the predictions against the labels, named by what was read
    (e.g. gen@expected-t-test_scatter.png), and for a training run learning_curve.png."""
    import matplotlib.pyplot as plt  # here: its import costs a second that only plots need

    folder, scale = Path(folder), [scored.cfg.low, scored.cfg.high]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(scored.labels, scored.preds, ".", alpha=0.6)  # a colour per target
    ax.plot(scale, scale, "k--", lw=1)
    result = scored.result
    ax.set(
        xlabel=f"true {scored.cfg.targets}",
        ylabel="predicted",
        xlim=scale,
        ylim=scale,
        title=f"{folder.resolve().name}: {scored.name}\nMAE {result['MAE']:.3f}, Corr {result['Corr']:.3f}",
    )
    stem = "-".join(re.findall(r"[\w@]+", scored.name))  # e.g. gen@expected-t-test
    files = [folder / f"{stem}_scatter.png"]
    fig.savefig(files[0], dpi=120, bbox_inches="tight")
    if (folder / "metrics.json").exists():
        files.append(learning_curve(plt, folder, scored.cfg))
    plt.close("all")
    print(f"plots: {', '.join(map(str, files))}")


def learning_curve(plt, folder, cfg):
    """The training loss and the validation MAE by epoch, in two panels, with the kept epoch -> the file."""
    log = read_log(folder)
    kept = json.loads((folder / "metrics.json").read_text())["kept_epoch"]
    epochs = [r["epoch"] for r in log]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(5, 5))
    if len(log) < 2:  # a lone dot is no curve
        bottom.text(
            0.5, 0.5, f"{len(log)} epoch: no curve", ha="center", transform=bottom.transAxes
        )
    else:
        top.plot(epochs, [r["train_loss"] for r in log], "o-")
        bottom.plot(epochs, [r["valid"]["MAE"] for r in log], "s-", label="this run")
    valid = [r["label"] for r in read_split(cfg, "valid")[0]]
    baseline = mean_baseline(cfg, valid)["MAE"]  # over every valid clip, --eval_clips or not
    bottom.axhline(baseline, color="grey", ls="--", label=f"train mean ({baseline:.3f})")
    bottom.axvline(kept, color="k", ls=":", label=f"kept epoch ({kept})")
    top.set(
        ylabel="training loss",
        title=f"{folder.resolve().name} ({cfg.readout}, {cfg.modalities})",
    )
    bottom.set(xlabel="epoch", ylabel="validation MAE")
    bottom.legend()
    fig.savefig(folder / "learning_curve.png", dpi=120, bbox_inches="tight")
    return folder / "learning_curve.png"


def figures(argv):
    """pooled.py --plot --ckpt RUN, with eval.py's flags: the run's figures on the split, written into its folder."""
    cmd = command(argv, __doc__)
    cmd.parser.add_argument("--plot", action="store_true", required=True, help="PNG figures")
    given = cmd.parse(argv)
    cfg = checkpoint_settings(cmd, given, given.get("ckpt"))
    draw(run_split(cfg, cfg.ckpt, cfg.split, cfg.target), cfg.ckpt or ".")


def compare_runs(argv):
    """pooled.py --compare A B, with eval.py's flags -> the comparison (also written with --json)."""
    cmd = command(argv, __doc__)
    cmd.parser.add_argument(
        "--compare", nargs=2, metavar=("A", "B"), required=True, help="two checkpoint folders"
    )
    given = cmd.parse(argv)
    folders = given["compare"]
    for folder in folders:  # both, before either is evaluated
        load_config(folder, READOUTS)
        read_tensors(Path(folder) / "weights.safetensors")
    runs = [checkpoint_settings(cmd, given, folder) for folder in folders]
    a, b = [run_split(cfg, folder, cfg.split, cfg.target) for cfg, folder in zip(runs, folders)]
    result = compare(a, b, folders, runs[0].split)
    if runs[0].json:
        save_json(Path(runs[0].json), result)
    return result


def pooled(per_seed, n=10000, seed=0):
    """per_seed: (seeds, clips) of d = |error of A| - |error of B| -> the mean of d, its 95% interval."""
    d = np.asarray(per_seed, dtype=np.float64)
    seeds, clips = d.shape
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    for i in range(n):
        drawn = d[rng.integers(0, seeds, seeds)]
        means[i] = drawn[:, rng.integers(0, clips, clips)].mean()
    ci = [float(np.percentile(means, q)) for q in (2.5, 97.5)]
    return dict(
        mean_abs_error_diff=float(d.mean()), ci95=ci, seeds=seeds, clips=clips, resamplings=n
    )


def verdict(paired):
    """Which side one comparison puts significantly ahead: 'A', 'B' or 'neither'."""
    if paired["p_value"] >= 0.05:
        return "neither"
    if paired["mean_abs_error_diff"] < 0:
        return "A"
    return "B"


def read(file):
    """A file pooled.py --compare --json wrote, with the per-clip differences, or SystemExit naming the problem."""
    try:
        comparison = json.loads(Path(file).read_text())
        comparison["paired"]["per_clip"]
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {file}: cannot be read ({e})") from None
    except (KeyError, TypeError):
        raise SystemExit(
            f"error: {file}: not a comparison with per-clip differences (pooled.py --compare A B --json "
            "FILE writes one; files written before it saved them: run the comparison again)"
        ) from None
    return comparison


def check_same(files, comparisons):
    """The comparisons must be of the same A and B, read the same way, on the same clips in the same order,
    or SystemExit names the file that differs from the first. Files written before eval.py saved what was
    read and the clip ids (`names`, `ids`) are checked by their number of clips alone, and a note says so."""
    sizes = {len(c["paired"]["per_clip"]) for c in comparisons}
    if len(sizes) > 1:
        raise SystemExit(
            f"error: the comparisons are over different numbers of clips ({sorted(sizes)})"
        )
    for key, what in (("names", "what A and B are"), ("ids", "the clips or their order")):
        saved = [(f, c[key]) for f, c in zip(files, comparisons) if key in c]
        for file, value in saved[1:]:
            if value != saved[0][1]:
                shown = f" ({value} against {saved[0][1]})" if key == "names" else ""
                raise SystemExit(
                    f"error: {file} and {saved[0][0]} differ in {what}{shown}: one statement pools "
                    "the same comparison over seeds"
                )
    old = [f for f, c in zip(files, comparisons) if "ids" not in c or "names" not in c]
    if old:
        print(
            f"note: {', '.join(old)} hold no clip ids or readout names (written before eval.py saved "
            "them): the same A, B and clip order are assumed in every file"
        )


def main(argv=None):
    if "--compare" in argv:
        return compare_runs(argv)
    if "--bootstrap" in argv:
        return intervals(argv)
    if "--plot" in argv:
        return figures(argv)
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("files", nargs="+", help="pooled.py --compare --json files, one a seed")
    p.add_argument(
        "--json", default=None, metavar="FILE", help="write the statement as JSON to this file"
    )
    args = p.parse_args(argv)
    comparisons = [read(f) for f in args.files]
    check_same(args.files, comparisons)
    for file, c in zip(args.files, comparisons):
        s = c["paired"]
        print(
            f"{file}: A {c['checkpoints'][0]}, B {c['checkpoints'][1]}: d {s['mean_abs_error_diff']:+.4f} "
            f"[{s['ci95'][0]:+.4f}, {s['ci95'][1]:+.4f}], p = {s['p_value']:.4f}: ahead {verdict(s)}"
        )
    result = pooled([c["paired"]["per_clip"] for c in comparisons])
    ahead = [verdict(c["paired"]) for c in comparisons]
    result["significantly_ahead"] = {side: ahead.count(side) for side in ("A", "B", "neither")}
    lo, hi = result["ci95"]
    print(
        f"pooled over {result['seeds']} seeds x {result['clips']} clips: |error of A| - |error of B| "
        f"{result['mean_abs_error_diff']:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}] (bootstrap over seeds and "
        f"clips); significantly ahead: A on {ahead.count('A')}, B on {ahead.count('B')}, neither on "
        f"{ahead.count('neither')} of {len(ahead)}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (UserError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None
