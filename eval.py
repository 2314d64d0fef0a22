"""Evaluate a checkpoint (its config.json defines the run but for the run flags given here, e.g. --modalities t),
or the gen readout zero-shot: MMSA metrics, ms per clip, the train-mean baseline.

    python eval.py --ckpt runs/toy-disc-tav-s0 [--split test] [--bootstrap 1000] [--plot] [--json test.json]
    python eval.py --model tiny --data toy --readout gen              # zero-shot: no training, no LoRA
    python eval.py --compare runs/toy-disc-tav-s0 runs/toy-gen-tav-s0  # clip by clip, with a paired test
"""

import quickhelp

import argparse
import json
import re
import time
from collections import Counter, namedtuple
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tqdm import tqdm

from data import (
    SPLITS,
    UserError,
    data_root,
    load_clips,
    make_loader,
    read_split,
    to_device,
    write_atomically,
)
from readout import READOUTS, Flag, build

METRIC_KEYS = ("MAE", "Corr", "Acc2_has0", "F1_has0", "Acc2_non0", "F1_non0", "Acc5", "Acc7")


class Help(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # each flag's default after its help, where it has one
        shown = all(action.default is not v for v in (None, False, argparse.SUPPRESS))
        return action.help + (" (default: %(default)s)" if shown else "")


def reading_flags():
    """The run flags of every readout that say what is read and how: eval.py may change them."""
    return (
        Flag("model", str, "Qwen/Qwen2.5-Omni-7B", "a hub id, a local folder, a .gguf or 'tiny'"),
        Flag("quant", str, "nf4", "4-bit NF4 weights for the text decoder", ("nf4", "none")),
        Flag("data", str, "mosi", "'toy' or 'toy:N', 'mosi', 'mosei' (in $MSA_DATA) or a folder"),
        Flag("modalities", str, "tav", "any non-empty subset of 'tav': text, audio, video"),
        Flag("readout", str, "disc", "the readout (readout.py: READOUTS)", tuple(READOUTS)),
        Flag("fps", float, 2.0, "video frames sampled per second"),
        Flag("max_frames", int, 32, "at most this many frames per clip"),
        Flag("max_pixels", int, 128 * 28 * 28, "each frame resized to fit this many pixels"),
        Flag(
            "audio_in_video",
            bool,
            False,
            "with audio and video: Qwen's own prompt, the audio in the video's place",
        ),
    )


TRAINING_FLAGS = (  # the run flags of every readout that say how it trains (None: the preset's)
    Flag(
        "lora_targets",
        str,
        None,
        "a regex over module names, or 'paper' (default: by architecture)",
    ),
    Flag("lora_r", int, None, "LoRA rank (default: 16 tiny, 32 otherwise)"),
    Flag("lora_alpha", float, None, "LoRA scale = alpha / r (default: 2 r)"),
    Flag("lora_dropout", float, 0.05, "dropout on the LoRA input"),
    Flag("seed", int, 0, "LoRA and head initialisation, data order"),
    Flag("epochs", int, None, "default: 30 tiny, 5 otherwise"),
    Flag("batch_size", int, None, "clips per step and process (default: 8 tiny, 4)"),
    Flag("grad_accum", int, None, "batches per optimizer step (default: 1 tiny, 4)"),
    Flag("lr", float, None, "peak learning rate (default: 2e-3 tiny, 1e-4)"),
    Flag("weight_decay", float, 0.01, "AdamW weight decay"),
    Flag("warmup_ratio", float, 0.1, "share of steps with linear warm-up"),
    Flag("grad_clip", float, 1.0, "max gradient norm"),
    Flag(
        "group_by_length",
        bool,
        False,
        "batches of clips of similar transcript length: less padding",
    ),
)


def readout_flags():
    """{name: (Flag, the readouts that declare it)} over the readouts registered now."""
    flags = {}
    for name, readout in READOUTS.items():
        for f in readout.flags:
            flags.setdefault(f.name, (f, []))[1].append(name)
    return flags


MACHINE_FLAGS = (  # this machine's settings: never saved with a run, always from the command line in use
    Flag("device", str, "cuda" if torch.cuda.is_available() else "cpu", "cpu or cuda"),
    Flag("cache_dir", str, "cache", "decoded clips are kept here between epochs and runs"),
    Flag("cache_processed", bool, False, "keep the processor's output too (video: 4x disk)"),
    Flag("num_workers", int, 0, "DataLoader workers; also threads decoding up front"),
    Flag("eval_batch_size", int, 8, "clips per batch when evaluating"),
    Flag("on_bad", str, "error", "a bad clip: stop or skip it", ("error", "skip")),
    Flag("trust_remote_code", bool, False, "let transformers run code shipped with --model"),
)


def add_flag(p, flag, help=None):
    kind = dict(type=flag.type, choices=flag.choices)
    if flag.type is bool:
        kind = dict(action=argparse.BooleanOptionalAction)
    p.add_argument(f"--{flag.name}", default=flag.default, help=help or flag.help, **kind)


def run_flags(p, training=True):
    """The flags that define a run (config.json); training=False: only those that say how it is read."""
    for f in reading_flags() + (TRAINING_FLAGS if training else ()):
        add_flag(p, f)
    for f, readers in readout_flags().values():
        if training or f.reading:
            add_flag(p, f, f"{', '.join(readers)}: {f.help}")


def machine_flags(p):
    for f in MACHINE_FLAGS:
        add_flag(p, f)


RUN_FILES = ("config.json", "weights.safetensors", "last.safetensors", "log.jsonl", "metrics.json")

POSITIVE = ("epochs", "batch_size", "grad_accum", "lora_r", "lora_alpha", "lr", "grad_clip", "fps")
POSITIVE += ("max_frames", "max_pixels", "eval_batch_size", "max_new_tokens")


def check_values(cfg):
    """Flag values that parse but make no sense, as one line naming them."""
    wrong = [f"--{k} {cfg[k]} (must be above 0)" for k in POSITIVE if k in cfg and not cfg[k] > 0]
    if not 0 <= cfg.get("lora_dropout", 0) < 1:
        wrong.append(f"--lora_dropout {cfg['lora_dropout']} (must be from 0 to 1)")
    if wrong:
        raise UserError(f"flag values out of range: {', '.join(wrong)}")


def check_device(name):
    """--device, before any work is done: one that torch knows and this machine has."""
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as e:  # not a device name, no CUDA, no such GPU
        cause = str(e).strip().partition("\n")[0]
        raise UserError(
            f"--device {name}: cannot be used here ({cause}); --device cpu runs anywhere"
        ) from None


# A random tiny model needs more steps at a larger rate. LoRA r=32 trains 0.90% of the 7B Thinker's parameters.
PRESETS = {
    "tiny": dict(epochs=30, lr=2e-3, batch_size=8, grad_accum=1, lora_r=16),
    "pretrained": dict(epochs=5, lr=1e-4, batch_size=4, grad_accum=4, lora_r=32),
}


# --recipe paper: the settings two re-implementations of the paper agree on (their reading, not ours)
RECIPES = dict(
    paper=dict(
        head="mlp",
        loss="l1",
        lora_r=32,
        lora_alpha=32.0,
        lora_dropout=0.1,
        lora_targets="paper",
        lr=2e-4,
        head_lr=1e-3,
        max_frames=16,
    ),
)

# Flags that are gone: gen's median and mean rules' (nothing else read them), disc's --standardize (a run
# trained with it is refused: its predictions were on the standardised scale)
RETIRED = {"samples", "temperature", "standardize"}
# Generic run flags newer than saved runs: missing, they take their default (how those runs trained)
NEWER = {"group_by_length"}

RESOLVED = {*PRESETS["tiny"], "lora_alpha"}  # the flags that resolve() gives a value


def resolve(cfg):
    cfg.update(
        {
            k: v
            for k, v in PRESETS["tiny" if cfg["model"] == "tiny" else "pretrained"].items()
            if cfg[k] is None
        }
    )
    cfg["lora_alpha"] = cfg["lora_alpha"] or 2.0 * cfg["lora_r"]
    return cfg


def run_config(cfg=None):
    """The settings that define a run (what config.json holds): the generic ones and those its readout
    declares, of `cfg`; without one, every run flag's default for the tiny model."""
    p = argparse.ArgumentParser()
    run_flags(p)
    defaults = resolve(vars(p.parse_args(["--model", "tiny"])))
    if cfg is None:
        return defaults
    others = readout_flags().keys() - {f.name for f in READOUTS[cfg["readout"]].flags}
    # a NEWER flag at its default is left out: a run without it keeps its config and ablate.py's hash
    others |= {k for k in NEWER if cfg[k] == defaults[k]}
    return {k: cfg[k] for k in defaults if k not in others}


def trained_state(readout):
    """What a checkpoint holds: the readout's own tensors and the LoRA ones, never the base weights."""
    return {
        k: v
        for k, v in readout.state_dict().items()
        if not k.startswith("backbone.") or "lora_" in k
    }


def save_tensors(file, tensors, metadata=None):
    write_atomically(
        file, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata)
    )


def save_json(file, value):
    write_atomically(file, (json.dumps(value, indent=2) + "\n").encode())


def read_tensors(file, device="cpu"):
    """Tensors of a safetensors file (never a pickle), or a UserError naming the file."""
    if not Path(file).is_file():
        raise UserError(f"{file}: not found")
    try:
        return load_file(file, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{file}: not a complete safetensors file ({e})") from None


def load_weights(readout, weights, file):
    """Load a checkpoint's tensors into `readout`, after checking that they are exactly the ones it trains."""
    expected = {n: tuple(t.shape) for n, t in trained_state(readout).items()}
    found = {n: tuple(t.shape) for n, t in weights.items()}
    if found != expected:
        wrong = sorted(n for n in expected.keys() | found.keys() if expected.get(n) != found.get(n))
        raise UserError(
            f"{file}: does not fit the run its config.json describes ({len(wrong)} tensors missing, "
            f"unexpected or of another shape, e.g. {wrong[0]}: {found.get(wrong[0])} in the file, "
            f"{expected.get(wrong[0])} expected)"
        )
    readout.load_state_dict(weights, strict=False)


def load_config(folder):
    """A checkpoint's config.json, checked key by key against the run flags (type, choices). A flag of its
    readout, or in NEWER, that is newer than the run takes its default; other readouts' flags (runs saved
    before readouts owned their flags hold them all) are dropped."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise UserError(
            f"{file}: not found ({folder} is not a checkpoint folder written by train.py)"
        )
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{file}: not a JSON object")
    if cfg.get("standardize"):
        raise UserError(f"{file}: trained with --standardize, which this version no longer reads")
    flags = {f.name: f for f in reading_flags() + TRAINING_FLAGS}
    own = {f.name: f for f in getattr(READOUTS.get(cfg.get("readout")), "flags", ())}
    others = readout_flags().keys() - own.keys() | RETIRED
    cfg = {k: v for k, v in cfg.items() if k not in others}
    flags.update(own)
    cfg = {**{k: flags[k].default for k in own.keys() | NEWER}, **cfg}
    problems = [f"unknown key {k!r}" for k in cfg.keys() - flags.keys()]
    problems += [f"missing key {k!r}" for k in flags.keys() - cfg.keys()]
    problems += [value_problem(flags[k], cfg[k]) for k in cfg.keys() & flags.keys()]
    problems = sorted(p for p in problems if p)
    if problems:
        raise UserError(f"{file}: {'; '.join(problems)}")
    return cfg


def value_problem(flag, value):
    """What is wrong with a saved value of a run flag (its type, a choice it lacks), or None."""
    types = (float, int) if flag.type is float else (flag.type,)
    if value is None and flag.default is None and flag.name not in RESOLVED:  # e.g. lora_targets
        return None
    if not isinstance(value, types) or (isinstance(value, bool) and flag.type is not bool):
        return f"{flag.name!r} is {value!r}, not a {flag.type.__name__}"
    if flag.choices and value not in flag.choices:
        return f"{flag.name!r} is {value!r}, not one of {', '.join(map(str, flag.choices))}"
    return None


def load_checkpoint(folder, flags, overrides=None):
    """(cfg, readout, processor) from a checkpoint folder: config.json (validated) but for `overrides`, then `flags`
    (a command line's) for the rest, such as the machine's settings. Only safetensors files are read."""
    config = load_config(folder)
    cfg = {**flags, **config, **{k: v for k, v in (overrides or {}).items() if k in config}}
    device = torch.device(cfg["device"])
    weights = read_tensors(Path(folder) / "weights.safetensors", device)
    readout, processor = build(cfg, device)
    load_weights(readout, weights, Path(folder) / "weights.safetensors")
    return cfg, readout, processor


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
    """A split -> (result: metrics, n, ms per clip (the first batch left out), gen's parse failures;
    preds, an unanswered clip as readout.fallback; labels). Under torchrun
    every process evaluates the whole split: simpler than shards, and a small share of an epoch's time."""
    readout.eval()
    preds, labels, times, info = [], [], [], Counter()
    for batch in tqdm(loader, desc="evaluating", leave=False):
        batch = to_device(batch, device)
        start = time.perf_counter()
        with autocast(device):
            p, extra = readout.predict(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start, len(p)))
        preds.append(p.float().cpu())
        labels.append(batch["label"].cpu())
        info.update({k: v for k, v in extra.items() if not torch.is_tensor(v)})  # not per-clip ones
    timed = times[1:] or times
    ms = 1000 * sum(t for t, _ in timed) / sum(n for _, n in timed)
    preds, labels = torch.cat(preds).numpy(), torch.cat(labels).numpy()
    counts = {}
    if readout.fallback is None:  # a readout without answers to parse: a NaN is a diverged model
        bad = int((~np.isfinite(preds)).sum())
        if bad:
            raise FloatingPointError(f"{bad} of {len(preds)} predictions are not finite")
    else:
        failed = np.isnan(preds)
        preds = np.where(failed, readout.fallback, preds)
        counts = dict(
            parse_failures=int(failed.sum()),
            parse_fail_rate=float(failed.mean()),
            out_of_bounds_rate=info["out_of_bounds"] / len(labels),
        )
    return dict(metrics(preds, labels), n=len(labels), ms_per_clip=ms, **counts), preds, labels


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


def read_log(folder):
    """A run's log.jsonl: the data's record, then one an epoch."""
    return [json.loads(line) for line in (Path(folder) / "log.jsonl").read_text().splitlines()]


def learning_curve(plt, folder, cfg):
    """The training loss and the validation MAE by epoch, in two panels, with the train-mean baseline's
    validation MAE and the kept epoch -> the file."""
    log = read_log(folder)[1:]  # after the data's record, one an epoch
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
        cfg, readout, processor = load_checkpoint(folder, args, overrides)
    elif args["readout"] != "gen":
        raise UserError(
            f"the {args['readout']} readout has a trained head: pass --ckpt (zero-shot is for gen)"
        )
    else:  # zero-shot: the untrained model, no LoRA
        cfg = {**run_config(), **args}
        readout, processor = build(cfg, torch.device(cfg["device"]), lora=False)
    name = cfg["readout"]
    if cfg["readout"] == "gen":  # how its answers became predictions
        name += f"@{cfg['decode']}"
    if not folder:
        name += " zero-shot"
    name += f" ({cfg['modalities']}, {args['split']})"
    clips = load_clips(cfg, args["split"])
    result, preds, labels = evaluate(
        readout, make_loader(cfg, clips, processor), torch.device(cfg["device"])
    )
    if args["bootstrap"]:
        result["ci95"] = bootstrap(preds, labels, args["bootstrap"])
    scored = Scored(cfg, name, result, preds, labels, [r["id"] for r in clips.rows])
    if args["plot"]:
        plot(scored, folder or ".")
    return scored


def given_flags(p, argv):
    """The flags a command line gives, as argparse reads them: it puts a default only where a name is not
    in the namespace yet, so one that holds every name with a marker keeps the marker for the rest."""
    unset = object()
    names = vars(p.parse_args(argv))
    parsed = vars(p.parse_args(argv, argparse.Namespace(**dict.fromkeys(names, unset))))
    return {k: v for k, v in parsed.items() if v is not unset}


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
    run_flags(run, training=False)
    quickhelp.save(p)
    args = vars(p.parse_args(argv))
    check_device(args["device"])
    run_settings = run_config()  # the given ones among them replace the run's
    overrides = {k: v for k, v in given_flags(p, argv).items() if k in run_settings}
    if args["compare"]:
        for folder in args["compare"]:  # both, before either is evaluated
            load_config(folder)
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
