"""Evaluate a checkpoint (its config.json defines the run but for the run flags given here, e.g. --modalities t),
or the gen readout zero-shot: MMSA metrics, ms per clip, the train-mean baseline.

    python eval.py --ckpt runs/toy-disc-tav-s0-HASH [--split test] [--json test.json] [--predictions p.csv]
    python eval.py --model tiny --data toy --readout gen              # zero-shot: no training, no LoRA
"""

import csv
import io
import time
from collections import Counter, defaultdict, namedtuple
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from batches import autocast, make_loader, to_device
from data import SPLITS, Clips, read_split
from readout import READOUTS, build, load_readout_file
from runs import load_config, load_weights, read_tensors, save_json
from settings import Command, Setting, Settings, grouped, readout_file
from util import UserError, write_atomically

METRIC_KEYS = ("MAE", "Corr", "Acc2_has0", "F1_has0", "Acc2_non0", "F1_non0", "Acc5", "Acc7")
# The standard counts in a readout's predict() info, summed over a split, and the rate each is reported as
COUNTS = dict(parse_failures="parse_fail_rate", out_of_bounds="out_of_bounds_rate")


def load_checkpoint(cfg, folder):
    """(readout, parts) of the run in `folder`, built as `cfg` says (its config.json's settings but for those a
    command line changed, such as the data or gen's --decode). Only safetensors are read."""
    device = torch.device(cfg.device)
    file = Path(folder) / "weights.safetensors"
    weights = read_tensors(file, device)
    readout, parts = build(cfg, device)
    trained = Settings(**load_config(folder, READOUTS))  # the hash is of the trained settings
    load_weights(readout, weights, file, trained)
    return readout, parts


def weighted_f1(truth, pred):
    """Support-weighted F1 over the classes present in `truth` (sklearn's average='weighted'); a class's F1
    is 2 TP / (2 TP + FP + FN), that is 2 TP over its predicted count plus its true count."""
    f1 = 0.0
    for c in np.unique(truth):
        tp = np.sum((pred == c) & (truth == c))
        f1 += np.mean(truth == c) * 2 * tp / (np.sum(pred == c) + np.sum(truth == c))
    return float(f1)


def metrics(preds, labels, targets=("label",), classes=True):
    """(clips,) or (clips, targets) -> MAE and Corr (averaged over the targets, and each target's with its name
    after, such as MAE_V, where there are several), and with `classes` MOSI's classification metrics."""
    p = np.asarray(preds, dtype=np.float64).reshape(len(preds), -1)
    y = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)
    each = [target_metrics(p[:, i], y[:, i], classes) for i in range(y.shape[1])]
    if len(each) == 1:
        return each[0]
    out = {k: float(np.mean([m[k] for m in each])) for k in each[0]}
    for name, m in zip(targets, each):
        out.update({f"{k}_{name}": v for k, v in m.items()})
    return out


def scoring(cfg):
    """metrics()'s keyword arguments for the task of the run `cfg` describes."""
    return dict(targets=cfg.targets.split(","), classes=cfg.classes)


def target_metrics(p, y, classes):
    """One target's metrics with the MMSA framework's conventions (accuracies and F1 as fractions)."""
    out = dict(
        MAE=float(np.mean(np.abs(p - y))),
        Corr=float(np.corrcoef(p, y)[0, 1]) if np.ptp(p) > 0 and np.ptp(y) > 0 else float("nan"),
    )
    if not classes:
        return out
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


@torch.no_grad()
def evaluate(readout, loader, device):
    """A split -> (result: metrics (where the clips have labels), n, ms per clip (the first batch left out),
    the standard counts and their rates; preds; labels; the rest of predict's info, a list per key and clip,
    such as gen's answers). Under torchrun every process evaluates the whole split: simpler than shards, and a
    small share of an epoch's time."""
    readout.eval()
    preds = []
    labels = []
    times = []
    counts = Counter()
    per_clip = defaultdict(list)
    for batch in tqdm(
        loader, desc="evaluating", leave=False, disable=None
    ):  # None: on a terminal only
        batch = to_device(batch, device)
        start = time.perf_counter()
        with autocast(device):
            p, info = readout.predict(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start, len(p)))
        preds.append(p.float().cpu())
        labels.append(batch["label"].cpu())
        for k, v in info.items():
            if k in COUNTS:
                counts[k] += v
            else:  # a value per clip
                per_clip[k] += v.tolist() if torch.is_tensor(v) else v
    timed = times[1:] or times
    ms = 1000 * sum(t for t, _ in timed) / sum(n for _, n in timed)
    preds, labels = torch.cat(preds).numpy(), torch.cat(labels).numpy()  # (clips, targets)
    bad = int((~np.isfinite(preds)).sum())
    if bad:  # a readout scores every clip: a NaN is a diverged model
        raise FloatingPointError(f"{bad} of {preds.size} predictions are not finite")
    scored = metrics(preds, labels, **scoring(readout.cfg)) if np.isfinite(labels).all() else {}
    result = dict(scored, n=len(labels), ms_per_clip=ms, **counts)
    result.update({rate: counts[k] / len(labels) for k, rate in COUNTS.items() if k in counts})
    return result, preds, labels, dict(per_clip)


def mean_baseline(cfg, labels):
    """Metrics of always predicting the training labels' mean (each target's), over the whole training split."""
    rows = read_split(cfg, "train")[0]
    train_mean = np.mean([r["label"] for r in rows], 0)
    labels = np.reshape(labels, (len(labels), -1))
    return metrics(np.broadcast_to(train_mean, labels.shape), labels, **scoring(cfg))


def table(rows, columns=METRIC_KEYS, first="run"):
    """{name: [metrics of each seed]} -> markdown: one value or mean ± sample std; '-': none."""
    lines = [
        f"| {first} | " + " | ".join(columns) + " | n | seeds |",
        "|---" * (len(columns) + 3) + "|",
    ]
    for name, runs in rows.items():
        cells = [cell([r[k] for r in runs if k in r], k) for k in columns]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {runs[0].get('n', '-')} | {len(runs)} |"
        )
    return "\n".join(lines)


def cell(values, key):
    """A table cell: '-' for no value, one value, or mean ± sample std."""
    if not values:
        return "-"
    f = ".4f" if len(values) == 1 else ".3f"
    if key == "ms_per_clip":
        f = ".1f"
    if len(values) > 1:
        return f"{np.mean(values):{f}} ± {np.std(values, ddof=1):{f}}"
    return f"{values[0]:{f}}"


def report(name, result, baseline):
    """Print a result of evaluate() beside the train-mean baseline, with gen's parse counts."""
    print(table({name: [result], "train mean": [baseline]}))
    line = f"{result['ms_per_clip']:.1f} ms/clip"
    if "parse_failures" in result:
        line += (
            f"  unparseable {result['parse_failures']} of {result['n']} (scored as the fallback), "
            f"out of the scale before clipping {result['out_of_bounds_rate']:.1%}"
        )
    print(line)


# A run's predictions on a split, with what evaluate() made of them; name: e.g. "gen@expected (t, test)"
Scored = namedtuple("Scored", "cfg name result preds labels ids per_clip")


def run_split(cfg, folder, split="test", target=None, labelled=True):
    """A checkpoint (None: gen zero-shot) on `split`, read as `cfg` says -> Scored (not `labelled`: the clips
    may have no labels, as --predictions allows)."""
    if folder:
        readout, parts = load_checkpoint(cfg, folder)
    elif not READOUTS[cfg.readout].zero_shot:
        raise UserError(f"the {cfg.readout} readout has to be trained: pass --ckpt")
    else:  # zero-shot: the untrained model, no LoRA
        readout, parts = build(cfg, torch.device(cfg.device), lora=False)
    name = readout.title() + ("" if folder else " zero-shot")  # e.g. gen@expected zero-shot
    name += f" ({cfg.modalities}, {split})"
    targets = cfg.targets.split(",")
    if target not in (None, *targets):
        raise UserError(f"--target {target}: not one of the run's targets ({cfg.targets})")
    clips = Clips(cfg, split, labelled)
    result, preds, labels, per_clip = evaluate(
        readout, make_loader(cfg, clips, parts), torch.device(cfg.device)
    )
    if target:  # one target of several
        column = [targets.index(target)]
        preds, labels = preds[:, column], labels[:, column]
        result.update(metrics(preds, labels, classes=cfg.classes))
        name += f" {target}"
    ids = [r["id"] for r in clips.rows]
    return Scored(cfg, name, result, preds, labels, ids, per_clip)


def write_predictions(file, scored):
    """A CSV of a row per clip: its id, the prediction per target, and each value per clip of the readout's
    predict() info (gen: the answer as written, whether it parsed; bins: std and median, a list over targets)."""
    targets = [scored.cfg.target] if scored.cfg.target else scored.cfg.targets.split(",")
    columns = dict(id=scored.ids)
    columns.update({f"predicted_{t}": scored.preds[:, i].tolist() for i, t in enumerate(targets)})
    columns.update(scored.per_clip)
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(columns)
    writer.writerows(zip(*columns.values()))
    write_atomically(file, table.getvalue().encode())
    print(f"predictions: {file} ({len(scored.ids)} clips)")


# eval.py's own settings (pooled.py's too)
OWN = grouped(
    "this command",
    Setting("ckpt", str, None, "a checkpoint folder written by train.py"),
    Setting("split", str, "test", "the split to evaluate", SPLITS),
    Setting("target", str, None, "of a run with several targets: report (and compare) this one"),
    Setting("json", str, None, "write the results as JSON to this file", metavar="FILE"),
    Setting(
        "predictions",
        str,
        None,
        "write each clip's prediction (in the task's range; gen: its answer, whether it parsed) to this CSV; "
        "the clips need no labels: --data may be a CSV without the targets, an mp4 or wav, or a folder of them",
        metavar="FILE",
    ),
)


def command(argv, doc=__doc__, own=OWN):
    """eval.py's command line (pooled.py's and explain.py's too): of a run, only the settings that say how it is
    read, which replace its own where given; the readouts of the file that its --readout_file names."""
    if readout_file(argv):  # a fork's readouts, before the parser shows their settings
        load_readout_file(readout_file(argv))
    return Command(doc, READOUTS, own, training=False)


def checkpoint_settings(cmd, given, folder):
    """The settings of the run in `folder` (None: gen zero-shot, the defaults) but for those `given`."""
    return cmd.settings(given, load_config(folder, READOUTS) if folder else None)


def main(argv=None):
    cmd = command(argv)
    given = cmd.parse(argv)
    cfg = checkpoint_settings(cmd, given, given.get("ckpt"))
    scored = run_split(cfg, cfg.ckpt, cfg.split, cfg.target, not cfg.predictions)
    if cfg.predictions:
        write_predictions(Path(cfg.predictions), scored)
    if "MAE" in scored.result:
        report(scored.name, scored.result, mean_baseline(scored.cfg, scored.labels))
    if cfg.json:
        save_json(Path(cfg.json), scored.result)


if __name__ == "__main__":
    try:
        main()
    except (UserError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None
