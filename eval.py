"""Evaluate a checkpoint (its config.json defines the run but for the run flags given here, e.g. --modalities t),
or the gen readout zero-shot: MMSA metrics, ms per clip, the train-mean baseline.

    python eval.py --ckpt runs/toy-disc-tav-s0 [--split test] [--bootstrap 1000] [--plot] [--json test.json]
    python eval.py --model tiny --data toy --readout gen              # zero-shot: no training, no LoRA
    python eval.py --compare runs/toy-disc-tav-s0 runs/toy-gen-tav-s0  # clip by clip, with a paired test
"""

import argparse
import json
import re
import time
from collections import Counter, namedtuple
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from batches import make_loader, to_device
from data import SPLITS, UserError, data_root, load_clips, read_split
from flags import Help, device_of, given_flags, machine_flags, readout_file, run_flags
from readout import READOUTS, build, load_readout_file
from runs import default_config, load_config, load_weights, read_log, read_tensors, save_json

METRIC_KEYS = ("MAE", "Corr", "Acc2_has0", "F1_has0", "Acc2_non0", "F1_non0", "Acc5", "Acc7")
# The standard counts in a readout's predict() info, summed over a split, and the rate each is reported as
COUNTS = dict(parse_failures="parse_fail_rate", out_of_bounds="out_of_bounds_rate")


def load_checkpoint(folder, flags, overrides=None):
    """(cfg, readout, parts) from a run folder: config.json (brought up to date, checked) but for `overrides`,
    then `flags` (a command line's) for the rest, such as the machine's settings. Only safetensors are read."""
    config = load_config(folder, READOUTS)
    cfg = {**flags, **config, **{k: v for k, v in (overrides or {}).items() if k in config}}
    device = torch.device(cfg["device"])
    file = Path(folder) / "weights.safetensors"
    weights = read_tensors(file, device)
    readout, parts = build(cfg, device)
    load_weights(readout, weights, file, {**cfg, **config})  # the hash is of the trained settings
    return cfg, readout, parts


def weighted_f1(truth, pred):
    """Support-weighted F1 over the classes present in `truth` (sklearn's average='weighted'); a class's F1
    is 2 TP / (2 TP + FP + FN), that is 2 TP over its predicted count plus its true count."""
    f1 = 0.0
    for c in np.unique(truth):
        tp = np.sum((pred == c) & (truth == c))
        f1 += np.mean(truth == c) * 2 * tp / (np.sum(pred == c) + np.sum(truth == c))
    return float(f1)


def metrics(preds, labels):
    """Regression metrics with the MMSA framework's conventions (accuracies and F1 as fractions)."""
    p, y = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    out = dict(
        MAE=float(np.mean(np.abs(p - y))),
        Corr=float(np.corrcoef(p, y)[0, 1]) if np.ptp(p) > 0 and np.ptp(y) > 0 else float("nan"),
    )
    out["Acc2_has0"] = float(np.mean((p >= 0) == (y >= 0)))  # negative vs non-negative
    out["F1_has0"] = weighted_f1(y >= 0, p >= 0)
    nz = y != 0  # label-0 clips dropped
    out["Acc2_non0"] = float(np.mean((p[nz] > 0) == (y[nz] > 0)))
    out["F1_non0"] = weighted_f1(y[nz] > 0, p[nz] > 0)
    for k, bound in (("Acc5", 2), ("Acc7", 3)):  # np.round: half to even
        out[k] = float(
            np.mean(np.round(np.clip(p, -bound, bound)) == np.round(np.clip(y, -bound, bound)))
        )
    return out


def autocast(device):
    """bfloat16 compute on a GPU (the 4-bit layers' compute dtype), float32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(readout, loader, device):
    """A split -> (result: metrics, n, ms per clip (the first batch left out), the standard counts and their
    rates; preds; labels). Under torchrun every process evaluates the whole split: simpler than shards, and a
    small share of an epoch's time."""
    readout.eval()
    preds, labels, times, counts = [], [], [], Counter()
    for batch in tqdm(loader, desc="evaluating", leave=False):
        batch = to_device(batch, device)
        start = time.perf_counter()
        with autocast(device):
            p, info = readout.predict(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start, len(p)))
        preds.append(p.float().cpu())
        labels.append(batch["label"].cpu())
        counts.update({k: v for k, v in info.items() if k in COUNTS})
    timed = times[1:] or times
    ms = 1000 * sum(t for t, _ in timed) / sum(n for _, n in timed)
    preds, labels = torch.cat(preds).numpy(), torch.cat(labels).numpy()
    bad = int((~np.isfinite(preds)).sum())
    if bad:  # a readout scores every clip: a NaN is a diverged model
        raise FloatingPointError(f"{bad} of {len(preds)} predictions are not finite")
    result = dict(metrics(preds, labels), n=len(labels), ms_per_clip=ms, **counts)
    result.update({rate: counts[k] / len(labels) for k, rate in COUNTS.items() if k in counts})
    return result, preds, labels


def bootstrap(preds, labels, n=1000, seed=0, keys=("MAE", "Corr", "Acc2_non0", "Acc7")):
    """95% percentile intervals of the metrics `keys` over `n` resamplings of the clips with replacement."""
    idx = np.random.default_rng(seed).integers(0, len(labels), (n, len(labels)))
    samples = [metrics(preds[i], labels[i]) for i in idx]
    return {
        k: [float(np.nanpercentile([s[k] for s in samples], q)) for q in (2.5, 97.5)] for k in keys
    }


def paired(preds_a, preds_b, labels, n=10000, seed=0):
    """A against B on the same clips: d = |error of A| - |error of B| per clip, its mean with a bootstrap 95% interval,
    a two-sided paired permutation test (each clip's sign flipped at random n times), who is closer how often, and d."""
    d = np.abs(preds_a - labels) - np.abs(preds_b - labels)
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


def mean_baseline(cfg, labels):
    """Metrics of always predicting the training-label mean."""
    train_mean = np.mean(
        [r["label"] for r in read_split(data_root(cfg["data"]), "train", on_bad="skip")[0]]
    )
    return metrics(np.full(len(labels), train_mean), labels)


def table(rows, columns=METRIC_KEYS, first="run"):
    """{name: [metrics of each seed]} -> markdown: one value (and its 95% interval) or mean ± sample std; '-': none."""
    lines = [
        f"| {first} | " + " | ".join(columns) + " | n | seeds |",
        "|---" * (len(columns) + 3) + "|",
    ]
    for name, runs in rows.items():
        cells = [
            cell([r[k] for r in runs if k in r], k, runs[0].get("ci95", {}).get(k)) for k in columns
        ]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {runs[0].get('n', '-')} | {len(runs)} |"
        )
    return "\n".join(lines)


def cell(values, key, ci=None):
    """A table cell: '-' for no value, one value (with its 95% interval), or mean ± sample std."""
    if not values:
        return "-"
    f = ".4f" if len(values) == 1 else ".3f"
    if key == "ms_per_clip":
        f = ".1f"
    if len(values) > 1:
        return f"{np.mean(values):{f}} ± {np.std(values, ddof=1):{f}}"
    if ci:
        return f"{values[0]:{f}} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{values[0]:{f}}"


def report(name, result, baseline):
    """Print a result of evaluate() beside the train-mean baseline, with gen's parse counts."""
    print(table({name: [result], "train mean": [baseline]}))
    line = f"{result['ms_per_clip']:.1f} ms/clip"
    if "parse_failures" in result:
        line += (
            f"  unparseable {result['parse_failures']} of {result['n']} (scored as the fallback), "
            f"out of [-3, 3] before clipping {result['out_of_bounds_rate']:.1%}"
        )
    print(line)


def plot(scored, folder):
    """PNGs in `folder`, their paths printed: the predictions against the labels, named by what was read
    (e.g. gen@expected-t-test_scatter.png), and for a training run learning_curve.png."""
    import matplotlib.pyplot as plt  # here: its import costs a second that only plots need

    folder = Path(folder)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(scored.labels, scored.preds, ".", alpha=0.6)
    ax.plot([-3, 3], [-3, 3], "k--", lw=1)
    ax.set(
        xlabel="true score",
        ylabel="predicted score",
        title=f"{folder.resolve().name}: {scored.name}\nMAE {scored.result['MAE']:.3f}",
    )
    stem = "-".join(re.findall(r"[\w@]+", scored.name))  # e.g. gen@expected-t-test
    files = [folder / f"{stem}_scatter.png"]
    fig.savefig(files[0], dpi=120, bbox_inches="tight")
    if (folder / "metrics.json").exists():
        files.append(learning_curve(plt, folder, scored.cfg))
    plt.close("all")
    print(f"plots: {', '.join(map(str, files))}")


def learning_curve(plt, folder, cfg):
    """The training loss and the validation MAE by epoch, in two panels, with the train-mean baseline's
    validation MAE and the kept epoch -> the file."""
    log = read_log(folder)
    kept = json.loads((folder / "metrics.json").read_text())["kept_epoch"]
    valid = read_split(data_root(cfg["data"]), "valid", on_bad="skip")[0]
    baseline = mean_baseline(cfg, [r["label"] for r in valid])["MAE"]
    epochs = [r["epoch"] for r in log]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(5, 5))
    top.plot(epochs, [r["train_loss"] for r in log], "o-")
    bottom.plot(epochs, [r["valid"]["MAE"] for r in log], "s-", label="this run")
    bottom.axhline(baseline, color="gray", ls="--", label="train-mean baseline")
    bottom.axvline(kept, color="k", ls=":", label=f"kept epoch ({kept})")
    top.set(
        ylabel="training loss",
        title=f"{folder.resolve().name} ({cfg['readout']}, {cfg['modalities']})",
    )
    bottom.set(xlabel="epoch", ylabel="validation MAE")
    bottom.legend()
    fig.savefig(folder / "learning_curve.png", dpi=120, bbox_inches="tight")
    return folder / "learning_curve.png"


# A run's predictions on a split, with what evaluate() made of them; name: e.g. "gen@expected (t, test)"
Scored = namedtuple("Scored", "cfg name result preds labels ids")


def run_split(folder, args, overrides):
    """A checkpoint (None: gen zero-shot) on args['split'], the run flags in `overrides` replacing its own."""
    if folder:
        cfg, readout, parts = load_checkpoint(folder, args, overrides)
    elif not READOUTS[args["readout"]].zero_shot:
        raise UserError(f"the {args['readout']} readout has to be trained: pass --ckpt")
    else:  # zero-shot: the untrained model, no LoRA
        cfg = {**default_config(READOUTS[args["readout"]], args["readout"]), **args}
        readout, parts = build(cfg, torch.device(cfg["device"]), lora=False)
    name = readout.title() + ("" if folder else " zero-shot")  # e.g. gen@expected zero-shot
    name += f" ({cfg['modalities']}, {args['split']})"
    clips = load_clips(cfg, args["split"])
    result, preds, labels = evaluate(
        readout, make_loader(cfg, clips, parts), torch.device(cfg["device"])
    )
    if args["bootstrap"]:
        result["ci95"] = bootstrap(preds, labels, args["bootstrap"])
    scored = Scored(cfg, name, result, preds, labels, [r["id"] for r in clips.rows])
    if args["plot"]:
        plot(scored, folder or ".")
    return scored


def compare(a, b, folders, split):
    """Two runs' predictions on the same clips, side by side and tested clip by clip."""
    if a.ids != b.ids or not np.array_equal(a.labels, b.labels):
        raise UserError(
            f"--compare: {folders[0]} ({a.cfg['data']}, {len(a.ids)} clips) and {folders[1]} "
            f"({b.cfg['data']}, {len(b.ids)} clips) are not evaluated on the same clips of {split!r}"
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


def main(argv=None):
    if readout_file(argv):  # a fork's readouts, before the parser shows their flags
        load_readout_file(readout_file(argv))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help, allow_abbrev=False)
    p.add_argument("--ckpt", help="a checkpoint folder written by train.py")
    p.add_argument(
        "--compare", nargs=2, metavar=("A", "B"), help="two checkpoints, tested clip by clip"
    )
    p.add_argument("--split", default="test", choices=SPLITS, help="the split to evaluate")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        metavar="N",
        help="95%% intervals from N resamplings of clips",
    )
    p.add_argument("--plot", action="store_true", help="scatter plot and learning curve PNGs")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON to this file")
    machine_flags(p.add_argument_group("this machine"))
    run = p.add_argument_group("the run (with --ckpt: only those given replace the run's own)")
    run_names = run_flags(run, READOUTS, training=False)
    args = vars(p.parse_args(argv))
    args["device"] = device_of(args["device"])
    overrides = {k: v for k, v in given_flags(p, argv).items() if k in run_names}
    if args["compare"]:
        for folder in args["compare"]:  # both, before either is evaluated
            load_config(folder, READOUTS)
            read_tensors(Path(folder) / "weights.safetensors")
        a, b = [run_split(folder, args, overrides) for folder in args["compare"]]
        result = compare(a, b, args["compare"], args["split"])
    else:
        scored = run_split(args["ckpt"], args, overrides)
        result = scored.result
        report(scored.name, result, mean_baseline(scored.cfg, scored.labels))
    if args["json"]:
        save_json(Path(args["json"]), result)


if __name__ == "__main__":
    try:
        main()
    except (UserError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None
