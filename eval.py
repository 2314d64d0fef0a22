"""Evaluate a checkpoint (its config.json defines the run but for the run flags given here, e.g. --modalities t),
or the gen readout zero-shot: MMSA metrics, ms per clip, the train-mean baseline.

    python eval.py --ckpt runs/toy-disc-tav-s0 [--split test] [--bootstrap 1000] [--plot] [--out test.json]
    python eval.py --model tiny --data toy --readout gen              # zero-shot: no training, no LoRA
    python eval.py --compare runs/toy-disc-tav-s0 runs/toy-gen-tav-s0  # clip by clip, with a paired test
"""

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
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
from readout import DECODE, READOUTS, build

METRIC_KEYS = ("MAE", "Corr", "Acc2_has0", "F1_has0", "Acc2_non0", "F1_non0", "Acc5", "Acc7")


class Help(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # each flag's default after its help, where it has one
        shown = (
            all(action.default is not v for v in (None, False, argparse.SUPPRESS))
            and "default" not in action.help
        )
        return action.help + (" (default: %(default)s)" if shown else "")


def run_flags(p, training=True):
    """The flags that define a run (config.json): what is read and how, how gen answers, and how it trains."""
    p.add_argument(
        "--model",
        default="Qwen/Qwen2.5-Omni-7B",
        help="a hub id, a local folder, a .gguf file or 'tiny'",
    )
    p.add_argument(
        "--quant",
        default="nf4",
        choices=["nf4", "none"],
        help="4-bit NF4 weights for the text decoder",
    )
    p.add_argument(
        "--data",
        default="mosi",
        help="'toy' or 'toy:N', 'mosi', 'mosei' (in $MSA_DATA) or a folder",
    )
    p.add_argument(
        "--modalities", default="tav", help="any non-empty subset of 'tav': text, audio, video"
    )
    p.add_argument(
        "--readout",
        default="disc",
        choices=list(READOUTS),
        help="; ".join(  # their first sentences
            f"{k}: {(v.__doc__ or '').split('.')[0].split(': ')[-1]}" for k, v in READOUTS.items()
        ),
    )
    p.add_argument("--fps", type=float, default=2.0, help="video frames sampled per second")
    p.add_argument("--max_frames", type=int, default=32, help="at most this many frames per clip")
    p.add_argument(
        "--max_pixels",
        type=int,
        default=128 * 28 * 28,
        help="each frame resized to fit this many pixels",
    )
    p.add_argument(
        "--audio_in_video",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="with audio and video: Qwen's own prompt, the audio in the video's place in 2-s chunks",
    )
    p.add_argument(
        "--decode", default="greedy", choices=DECODE, help="gen: how answers become a prediction"
    )
    p.add_argument(
        "--samples", type=int, default=8, help="gen, median and mean: answers drawn per clip"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="gen, median and mean: the sampling temperature",
    )
    p.add_argument(
        "--max_new_tokens", type=int, default=8, help="gen: at most this many tokens are generated"
    )
    p.add_argument(
        "--parse_fallback",
        type=float,
        default=0.0,
        help="gen: the prediction of an unparseable answer",
    )
    if not training:  # unset training flags take the backbone's preset (PRESETS)
        return
    p.add_argument(
        "--pool_norm",
        default="none",
        choices=["none", "batch"],
        help="disc, mean: standardised states",
    )
    p.add_argument(
        "--loss", default="mse", choices=["mse", "l1"], help="disc, mean: the regression loss"
    )
    p.add_argument(
        "--lora_targets", default=None, help="a regex over module names (default: by architecture)"
    )
    p.add_argument(
        "--lora_r", type=int, default=None, help="LoRA rank (default: 16 tiny, 32 otherwise)"
    )
    p.add_argument(
        "--lora_alpha", type=float, default=None, help="LoRA scale = alpha / r (default: 2 r)"
    )
    p.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA input")
    p.add_argument("--seed", type=int, default=0, help="LoRA and head initialisation, data order")
    p.add_argument("--epochs", type=int, default=None, help="default: 30 tiny, 5 otherwise")
    p.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="clips per step and process (default: 8 tiny, 4)",
    )
    p.add_argument(
        "--grad_accum",
        type=int,
        default=None,
        help="batches per optimizer step (default: 1 tiny, 4)",
    )
    p.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (default: 2e-3 tiny, 1e-4)"
    )
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument(
        "--warmup_ratio", type=float, default=0.1, help="share of steps with linear warm-up"
    )
    p.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm")


def machine_flags(p):
    """This machine's settings: never saved with a run, always taken from the command line in use."""
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    p.add_argument(
        "--cache_dir", default="cache", help="decoded clips are kept here between epochs and runs"
    )
    p.add_argument(
        "--cache_processed",
        action="store_true",
        help="keep the processor's output too (video: 4x disk)",
    )
    p.add_argument(
        "--num_workers",
        type=int,
        default=0,
        help="DataLoader workers; also threads decoding up front",
    )
    p.add_argument("--eval_batch_size", type=int, default=8, help="clips per batch when evaluating")
    p.add_argument(
        "--on_bad", default="error", choices=["error", "skip"], help="a bad clip: stop or skip it"
    )
    p.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="let transformers run code shipped with --model",
    )


# A random tiny model needs more steps at a larger rate. LoRA r=32 trains 0.90% of the 7B Thinker's parameters.
PRESETS = {
    "tiny": dict(epochs=30, lr=2e-3, batch_size=8, grad_accum=1, lora_r=16),
    "pretrained": dict(epochs=5, lr=1e-4, batch_size=4, grad_accum=4, lora_r=32),
}


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
    """The settings that define a run (what config.json holds): of `cfg`, or their defaults for the tiny model."""
    p = argparse.ArgumentParser()
    run_flags(p)
    defaults = resolve(vars(p.parse_args(["--model", "tiny"])))
    return defaults if cfg is None else {k: cfg[k] for k in defaults}


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
    """A checkpoint's config.json, checked key by key and type by type against this code's run settings."""
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
    reference = run_config()
    problems = [f"unknown key {k!r}" for k in cfg.keys() - reference.keys()]
    problems += [f"missing key {k!r}" for k in reference.keys() - cfg.keys()]
    for k in (
        cfg.keys() & reference.keys()
    ):  # the type of the default; None: a string or null; a float: an int too
        want, got = type(reference[k]), type(cfg[k])
        if not (got is want or (want, got) in ((type(None), str), (float, int))):
            problems.append(
                f"{k!r} is {cfg[k]!r}, not a {'str or null' if reference[k] is None else want.__name__}"
            )
    if problems:
        raise UserError(f"{file}: {'; '.join(sorted(problems))}")
    return cfg


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


@torch.no_grad()
def evaluate(readout, loader, device, fallback=0.0):
    """A split -> (result: metrics, n, ms per clip (the first batch left out), gen's parse failures and metrics over
    answered clips; preds, an unanswered one as `fallback`; labels). Under torchrun, all ranks' clips in order."""
    readout.eval()
    preds, labels, times, info = [], [], [], Counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)  # sampled answers: the same in every evaluation, whatever came before
        for batch in tqdm(loader, desc="evaluating", leave=False):
            batch = to_device(batch, device)
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                p, extra = readout.predict(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start, len(p)))
            preds.append(p.float().cpu())
            labels.append(batch["label"].cpu())
            info.update(extra)
    timed = times[1:] or times
    ms = 1000 * sum(t for t, _ in timed) / sum(n for _, n in timed)
    preds, labels = torch.cat(preds).numpy(), torch.cat(labels).numpy()
    if dist.is_initialized():  # each rank evaluated every world-th clip
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (list(loader.sampler), preds, labels, info, ms))
        order = np.argsort(np.concatenate([p[0] for p in parts]))
        preds, labels = (np.concatenate([p[i] for p in parts])[order] for i in (1, 2))
        info, ms = sum((p[3] for p in parts), Counter()), float(np.mean([p[4] for p in parts]))
    failed = np.isnan(preds)
    result = dict(metrics(np.where(failed, fallback, preds), labels), n=len(labels), ms_per_clip=ms)
    if "parse_failures" in info:
        result.update(
            parse_failures=int(failed.sum()),
            parse_fail_rate=float(failed.mean()),
            tokens_per_clip=info["generated_tokens"] / len(labels),
            parsed=metrics(preds[~failed], labels[~failed]) if (~failed).sum() > 1 else None,
        )
    return result, np.where(failed, fallback, preds), labels


def bootstrap(preds, labels, n=1000, seed=0, keys=("MAE", "Corr", "Acc2_non0", "Acc7")):
    """95% percentile intervals of the metrics `keys` over `n` resamplings of the clips with replacement."""
    idx = np.random.default_rng(seed).integers(0, len(labels), (n, len(labels)))
    samples = [metrics(preds[i], labels[i]) for i in idx]
    return {
        k: [float(np.nanpercentile([s[k] for s in samples], q)) for q in (2.5, 97.5)] for k in keys
    }


def paired(preds_a, preds_b, labels, n=10000, seed=0):
    """A against B on the same clips: d = |error of A| - |error of B| per clip, its mean with a bootstrap 95% interval,
    a two-sided paired permutation test (each clip's sign flipped at random n times), and who is closer how often."""
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
        n=len(d),
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
        cells = []
        for k in columns:
            values, ci = [r[k] for r in runs if k in r], runs[0].get("ci95", {}).get(k)
            f = ".1f" if k == "ms_per_clip" else ".4f" if len(runs) == 1 else ".3f"
            cells.append(
                "-"
                if not values
                else f"{np.mean(values):{f}} ± {np.std(values, ddof=1):{f}}"
                if len(values) > 1
                else f"{values[0]:{f}}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
            )
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {runs[0].get('n', '-')} | {len(runs)} |"
        )
    return "\n".join(lines)


def report(name, result, baseline):
    """Print a result of evaluate() beside the train-mean baseline, with gen's parse counts."""
    rows = {name: [result], "train mean": [baseline]}
    if result.get("parsed"):
        rows[f"{name}, answered clips only"] = [result["parsed"]]
    print(table(rows))
    gen = (
        (
            f"  unparseable {result['parse_failures']} of {result['n']} (scored as the fallback), "
            f"{result['tokens_per_clip']:.1f} generated tokens/clip"
        )
        if "parse_failures" in result
        else ""
    )
    print(f"{result['ms_per_clip']:.1f} ms/clip{gen}")


def plot(preds, labels, folder, split):
    """<split>_scatter.png and, for a training run, learning_curve.png (the kept epoch marked) in `folder`."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(labels, preds, ".", alpha=0.6, label=f"Corr {metrics(preds, labels)['Corr']:.3f}")
    ax.plot([-3, 3], [-3, 3], "k--", lw=1)
    ax.set(xlabel="true score", ylabel="predicted score", title=f"{split}, {len(labels)} clips")
    ax.legend()
    fig.savefig(Path(folder) / f"{split}_scatter.png", dpi=120, bbox_inches="tight")
    if (Path(folder) / "log.jsonl").exists():
        log = [
            r
            for r in map(json.loads, (Path(folder) / "log.jsonl").read_text().splitlines())
            if "epoch" in r
        ]
        kept = json.loads((Path(folder) / "metrics.json").read_text())["kept_epoch"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(
            [r["epoch"] for r in log], [r["train_loss"] for r in log], "o-", label="training loss"
        )
        ax.plot(
            [r["epoch"] for r in log],
            [r["valid"]["MAE"] for r in log],
            "s-",
            label="validation MAE",
        )
        ax.axvline(kept, color="k", ls=":", label=f"kept epoch ({kept})")
        ax.set(xlabel="epoch", title=Path(folder).name)
        ax.legend()
        fig.savefig(Path(folder) / "learning_curve.png", dpi=120, bbox_inches="tight")
    plt.close("all")


def run_split(folder, args, given):
    """A checkpoint (None: gen zero-shot) on args['split'] -> (cfg, name, result, preds, labels, clip ids)."""
    if folder:
        cfg, readout, processor = load_checkpoint(folder, args, {k: args[k] for k in given})
    elif args["readout"] != "gen":
        raise UserError(
            f"the {args['readout']} readout has a trained head: pass --ckpt (zero-shot is for gen)"
        )
    else:  # zero-shot: the untrained model, no LoRA
        cfg = {**run_config(), **args}
        readout, processor = build(cfg, torch.device(cfg["device"]), lora=False)
    rule = (
        f"@{cfg['decode']}" if cfg["readout"] == "gen" else ""
    )  # how gen's answers became predictions
    name = f"{cfg['readout']}{rule}{'' if folder else ' zero-shot'} ({cfg['modalities']}, {args['split']})"
    loader = make_loader(cfg, load_clips(cfg, args["split"]), processor)
    result, preds, labels = evaluate(
        readout, loader, torch.device(cfg["device"]), cfg["parse_fallback"]
    )
    if args["bootstrap"]:
        result["ci95"] = bootstrap(preds, labels, args["bootstrap"])
    if args["plot"]:
        plot(preds, labels, folder or ".", args["split"])
    return cfg, name, result, preds, labels, [r["id"] for r in loader.dataset.rows]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help, allow_abbrev=False)
    p.add_argument("--ckpt", default=None, help="a checkpoint folder written by train.py")
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("CKPT_A", "CKPT_B"),
        help="two checkpoints, tested clip by clip",
    )
    p.add_argument("--split", default="test", choices=SPLITS, help="the split to evaluate")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        metavar="N",
        help="95%% intervals from N resamplings of clips",
    )
    p.add_argument(
        "--plot",
        action="store_true",
        help="scatter plot and learning curve PNGs (needs matplotlib)",
    )
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    machine_flags(p.add_argument_group("this machine"))
    run_flags(
        p.add_argument_group("the run (with --ckpt: only those given replace the run's own)"),
        training=False,
    )
    args = vars(p.parse_args(argv))
    given = {
        t.partition("=")[0][2:].removeprefix("no-")
        for t in (sys.argv[1:] if argv is None else argv)
        if t.startswith("--")
    }
    if args["compare"]:
        (
            (cfg_a, name_a, result_a, preds_a, labels, ids_a),
            (cfg_b, name_b, result_b, preds_b, _, ids_b),
        ) = [run_split(folder, args, given) for folder in args["compare"]]
        if (
            data_root(cfg_a["data"]).resolve() != data_root(cfg_b["data"]).resolve()
            or ids_a != ids_b
        ):
            raise UserError(
                f"--compare: {args['compare'][0]} ({cfg_a['data']}, {len(ids_a)} clips) and "
                f"{args['compare'][1]} ({cfg_b['data']}, {len(ids_b)} clips) are not evaluated on the "
                f"same clips of the {args['split']!r} split"
            )
        print(table({f"A: {name_a}": [result_a], f"B: {name_b}": [result_b]}))
        c = paired(preds_a, preds_b, labels)
        print(
            f"paired over {c['n']} clips, |error of A| - |error of B|: mean {c['mean_abs_error_diff']:+.4f}, 95% "
            f"bootstrap CI [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]; permutation test p = {c['p_value']:.4f} "
            f"({c['permutations']} sign flips); A closer on {c['a_closer']:.1%} of clips, B on {c['b_closer']:.1%}"
        )
        result = dict(a=result_a, b=result_b, paired=c, checkpoints=args["compare"])
    else:
        cfg, name, result, _, labels, _ = run_split(args["ckpt"], args, given)
        report(name, result, mean_baseline(cfg, labels))
    if args["out"]:
        save_json(Path(args["out"]), result)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
