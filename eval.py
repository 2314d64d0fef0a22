"""Evaluate a checkpoint, or a model zero-shot: MMSA metrics, ms per clip, and the train-mean baseline.

    python eval.py --ckpt runs/toy-disc-tav-s0 [--split test] [--out test.json] [--bootstrap 1000] [--plot]
    python eval.py --model tiny --data toy --readout gen          # zero-shot: no training, no LoRA
    python eval.py --compare runs/toy-disc-tav-s0 runs/toy-gen-tav-s0 # paired, clip by clip, with a test
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from data import CheckpointError, DataError, data_root, make_loader, read_split, to_device
from readout import READOUTS, build

METRIC_KEYS = ("MAE", "Corr", "Acc2_has0", "F1_has0", "Acc2_non0", "F1_non0", "Acc5", "Acc7")


def _weighted_f1(truth, pred):
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
    out = dict(MAE=float(np.mean(np.abs(p - y))),
               Corr=float(np.corrcoef(p, y)[0, 1]) if np.ptp(p) > 0 and np.ptp(y) > 0 else float("nan"))
    out["Acc2_has0"] = float(np.mean((p >= 0) == (y >= 0)))               # negative vs non-negative
    out["F1_has0"] = _weighted_f1(y >= 0, p >= 0)
    nz = y != 0                                                           # label-0 clips dropped
    out["Acc2_non0"] = float(np.mean((p[nz] > 0) == (y[nz] > 0)))
    out["F1_non0"] = _weighted_f1(y[nz] > 0, p[nz] > 0)
    for k, bound in (("Acc5", 2), ("Acc7", 3)):                           # np.round: half to even
        out[k] = float(np.mean(np.round(np.clip(p, -bound, bound)) == np.round(np.clip(y, -bound, bound))))
    return out


@torch.no_grad()
def evaluate(readout, loader, device):
    """Predictions over a split -> (preds, labels, info). info['ms_per_clip'] excludes the first batch
    (warm-up) when there is more than one."""
    readout.eval()
    preds, labels, times, sizes, info = [], [], [], [], {}
    for batch in loader:
        batch = to_device(batch, device)
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            p, extra = readout.predict(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        sizes.append(len(p))
        preds.append(p.float().cpu())
        labels.append(batch["label"].cpu())
        for k, v in extra.items():
            info[k] = info.get(k, 0) + v
    timed = slice(1, None) if len(times) > 1 else slice(None)
    info["ms_per_clip"] = 1000 * sum(times[timed]) / sum(sizes[timed])
    return torch.cat(preds).numpy(), torch.cat(labels).numpy(), info


def summarize(preds, labels, info, fallback=0.0):
    """Headline metrics, an unanswered clip (NaN) scored as `fallback`, with n and ms per clip; for a
    readout that can fail to answer, the parse failures and the metrics over the answered clips alone."""
    failed = np.isnan(preds)
    out = dict(metrics(np.where(failed, fallback, preds), labels), n=len(labels), ms_per_clip=info["ms_per_clip"])
    if "parse_failures" in info:
        out.update(parse_failures=int(failed.sum()), parse_fail_rate=float(failed.mean()),
                   tokens_per_clip=info["generated_tokens"] / len(labels),
                   parsed=metrics(preds[~failed], labels[~failed]) if (~failed).sum() > 1 else None)
    return out


CI_KEYS = ("MAE", "Corr", "Acc2_non0", "Acc7")


def bootstrap(preds, labels, n=1000, seed=0):
    """95% percentile intervals of CI_KEYS over `n` resamplings of the clips with replacement."""
    idx = np.random.default_rng(seed).integers(0, len(labels), (n, len(labels)))
    samples = [metrics(preds[i], labels[i]) for i in idx]
    return {k: [float(np.nanpercentile([s[k] for s in samples], q)) for q in (2.5, 97.5)] for k in CI_KEYS}


def paired(preds_a, preds_b, labels, n=10000, seed=0):
    """A against B on the same clips. d = |error of A| - |error of B| per clip (negative: A is closer):
    its mean with a bootstrap 95% interval, the p-value of a two-sided paired permutation test (each clip's
    sign flipped at random, n times), and the shares of clips on which A and B are closer."""
    d = np.abs(preds_a - labels) - np.abs(preds_b - labels)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (n, len(d)))].mean(1)
    null = np.abs((rng.choice([-1.0, 1.0], (n, len(d))) * d).mean(1))
    return dict(mean_abs_error_diff=float(d.mean()), ci95=[float(np.percentile(means, q)) for q in (2.5, 97.5)],
                p_value=float((1 + np.sum(null >= abs(d.mean()) - 1e-12)) / (n + 1)), permutations=n,
                a_closer=float(np.mean(d < 0)), b_closer=float(np.mean(d > 0)), n=len(d))


def mean_baseline(cfg, labels):
    """Metrics of always predicting the training-label mean."""
    train_mean = np.mean([r["label"] for r in read_split(data_root(cfg["data"]), "train", on_bad="skip")[0]])
    return metrics(np.full(len(labels), train_mean), labels)


def format_table(rows):
    """rows: {name: metrics dict} -> a markdown table; a 'ci95' entry puts intervals beside the figures."""
    lines = ["| | " + " | ".join(METRIC_KEYS) + " |", "|---" * (len(METRIC_KEYS) + 1) + "|"]
    for name, m in rows.items():
        ci = m.get("ci95", {})
        cells = [f"{m[k]:.4f}" + (f" [{ci[k][0]:.3f}, {ci[k][1]:.3f}]" if k in ci else "") for k in METRIC_KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SEED_COLUMNS = ("MAE", "Corr", "Acc2_non0", "F1_non0", "Acc7")


def seed_table(title, results, first="run", extra=()):
    """results: {row name: [test metrics of each seed]} -> markdown, each cell mean ± std (sample std) over seeds;
    `extra` columns (e.g. parse_fail_rate, ms_per_clip) show '-' in rows that lack them."""
    columns = SEED_COLUMNS + tuple(extra)
    lines = [f"**{title}**", "", f"| {first} | " + " | ".join(columns) + " | n | seeds |",
             "|---" * (len(columns) + 3) + "|"]
    for name, runs in results.items():
        cells = []
        for k in columns:
            if k not in runs[0]:
                cells.append("-")
                continue
            values, f = np.array([r[k] for r in runs]), ".1f" if k == "ms_per_clip" else ".3f"
            cells.append(f"{values.mean():{f}} ± {values.std(ddof=1):{f}}" if len(runs) > 1 else f"{values[0]:{f}}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {runs[0]['n']} | {len(runs)} |")
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot drawing to files, or None after a one-line notice: plots are optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return None


def plot_predictions(preds, labels, folder, name):
    """<folder>/<name>_scatter.png (predicted vs true, identity line, Corr in the title) and
    <folder>/<name>_confusion.png (7 classes: scores rounded after clipping to [-3, 3]) -> the paths."""
    plt = pyplot()
    if plt is None:
        return []
    m = metrics(preds, labels)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(labels, preds, s=10, alpha=0.6)
    ax.plot([-3, 3], [-3, 3], "k--", lw=1)
    ax.set(xlim=(-3.2, 3.2), ylim=(-3.2, 3.2), xlabel="true score", ylabel="predicted score",
           title=f"{name}: Corr {m['Corr']:.3f}, MAE {m['MAE']:.3f}, n={len(labels)}")
    paths = [Path(folder) / f"{name}_scatter.png", Path(folder) / f"{name}_confusion.png"]
    fig.savefig(paths[0], dpi=120, bbox_inches="tight")
    classes = [np.round(np.clip(x, -3, 3)).astype(int) + 3 for x in (labels, preds)]
    counts = np.zeros((7, 7), dtype=int)
    np.add.at(counts, tuple(classes), 1)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.imshow(counts, cmap="Blues")
    for (i, j), c in np.ndenumerate(counts):
        ax.text(j, i, c, ha="center", va="center", fontsize=8, color="white" if c > counts.max() / 2 else "black")
    ax.set(xticks=range(7), yticks=range(7), xticklabels=range(-3, 4), yticklabels=range(-3, 4),
           xlabel="predicted class", ylabel="true class", title=f"{name}: Acc7 {m['Acc7']:.3f}")
    fig.savefig(paths[1], dpi=120, bbox_inches="tight")
    plt.close("all")
    return paths


def add_run_args(p):
    """The flags that define a run; train.py adds the optimisation ones."""
    p.add_argument("--model", default="Qwen/Qwen2.5-Omni-7B",
                   help="hub id or local transformers folder (a Qwen2.5-Omni model, or any text model), a .gguf "
                        "file (a causal LM; needs the gguf package), or 'tiny' (random, offline)")
    p.add_argument("--quant", default="nf4", choices=["nf4", "none"], help="4-bit NF4 weights for the text decoder")
    p.add_argument("--data", default="mosi",
                   help="'toy' (generated; 'toy:N' for N clips), 'mosi', 'mosei' (under $MSA_DATA, default ./data) "
                        "or a path to an MMSA-layout folder")
    p.add_argument("--modalities", default="tav", help="any non-empty subset of 'tav': text, audio, video")
    p.add_argument("--readout", default="disc", choices=list(READOUTS),
                   help="how the score is read out: disc (regression head on the last token's hidden state), "
                        "mean (the same head on the mean over tokens) or gen (generated text, parsed)")
    p.add_argument("--head", default="linear", choices=["linear", "mlp"], help="disc: the regression head")
    p.add_argument("--pool_norm", default="none", choices=["none", "batch"],
                   help="disc: standardise the pooled state (batch statistics in training, training-set ones after)")
    p.add_argument("--loss", default="mse", choices=["mse", "l1"], help="disc: the regression loss")
    p.add_argument("--max_new_tokens", type=int, default=8, help="gen: greedy decoding stops after this many tokens")
    p.add_argument("--parse_fallback", type=float, default=0.0,
                   help="gen: the score given to an unparseable answer in the headline metrics (0.0: neutral)")
    p.add_argument("--fps", type=float, default=2.0, help="video frames sampled per second")
    p.add_argument("--max_frames", type=int, default=32, help="at most this many frames per clip")
    p.add_argument("--max_pixels", type=int, default=128 * 28 * 28, help="frames are resized to fit this many pixels")
    p.add_argument("--on_bad", "--on_missing", default="error", choices=["error", "skip"],
                   help="a bad clip (bad label.csv row; missing, corrupt or streamless media file): stop with an "
                        "error naming it, or skip it and count it by reason")
    p.add_argument("--cache_dir", default="cache", help="where decoded clips are kept between epochs and runs")
    p.add_argument("--cache_processed", action="store_true",
                   help="keep each clip's processor output there too, so that later epochs skip the processor "
                        "(for video about 4x the disk of the decoded frames)")
    p.add_argument("--eval_batch_size", type=int, default=8, help="clips per batch when evaluating")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--lora_targets", default=None,
                   help="regex over module names (default by architecture: the Thinker's text decoder's "
                        "q,k,v,o,gate,up,down projections; for Llama/Qwen2/Mistral the same; for BERT "
                        "query,key,value and the dense layers)")
    p.add_argument("--lora_r", type=int, default=None,
                   help="LoRA rank (default: 32, about 0.9%% of the 7B Thinker's parameters; 16 for tiny)")
    p.add_argument("--lora_alpha", type=float, default=None, help="LoRA scale numerator, scale = alpha / r "
                                                                  "(default: 2 r)")
    p.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA input")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="let transformers run Python code shipped with --model (only for models you trust)")
    p.add_argument("--seed", type=int, default=0, help="seed of LoRA and head initialisation and data order")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    return p


def trained_state(readout):
    """What a checkpoint holds: the readout's own tensors and the LoRA ones, never the base weights."""
    return {k: v for k, v in readout.state_dict().items() if not k.startswith("backbone.") or "lora_" in k}


def read_weights(file, device="cpu"):
    """Tensors of a safetensors file (never a pickle), or a CheckpointError naming the file."""
    if not Path(file).is_file():
        raise CheckpointError(f"{file}: not found")
    try:
        return load_file(file, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a complete safetensors file ({e})") from None


def load_weights(readout, weights, file):
    """Load a checkpoint's tensors into `readout`, after checking that they are exactly the ones it trains."""
    expected = {n: tuple(t.shape) for n, t in trained_state(readout).items()}
    found = {n: tuple(t.shape) for n, t in weights.items()}
    if found != expected:
        wrong = sorted(n for n in expected.keys() | found.keys() if expected.get(n) != found.get(n))
        raise CheckpointError(f"{file}: does not fit the run its config.json describes ({len(wrong)} tensors "
                              f"missing, unexpected or of another shape, e.g. {wrong[0]}: {found.get(wrong[0])} in "
                              f"the file, {expected.get(wrong[0])} expected)")
    readout.load_state_dict(weights, strict=False)


def load_checkpoint(ckpt, device, trust_remote_code=False):
    """(cfg, readout, processor) rebuilt from a checkpoint folder alone. Only config.json (validated) and
    weights.safetensors are read; trust_remote_code comes from the caller, never from the folder."""
    from train import load_config  # train.py owns the config format (a top-level import would be circular)
    cfg = {**load_config(ckpt), "trust_remote_code": trust_remote_code}
    weights = read_weights(Path(ckpt) / "weights.safetensors", device)
    readout, processor = build(cfg, device)
    load_weights(readout, weights, Path(ckpt) / "weights.safetensors")
    return cfg, readout, processor


def report(name, result, baseline=None):
    """Print a result of summarize() as a table, with the parse counts of a generative readout."""
    rows = {name: result}
    if result.get("parsed"):
        rows[f"{name}, answered clips only"] = result["parsed"]
    if baseline:
        rows["train mean"] = baseline
    print(format_table(rows))
    line = f"n={result['n']}  {result['ms_per_clip']:.1f} ms/clip"
    if "parse_failures" in result:
        line += (f"  unparseable {result['parse_failures']} ({100 * result['parse_fail_rate']:.1f}%, scored as "
                 f"the fallback)  {result['tokens_per_clip']:.1f} generated tokens/clip")
    print(line)


def run_split(ckpt, args, device):
    """Evaluate a checkpoint (without one: the gen readout zero-shot) on args.split -> (cfg, name, result,
    preds with unanswered clips scored as the fallback, labels, clip ids)."""
    if ckpt:
        cfg, readout, processor = load_checkpoint(ckpt, device, args.trust_remote_code)
        name = f"{cfg['readout']} ({args.split})"
    elif args.readout != "gen":
        raise SystemExit(f"eval.py: the {args.readout} readout's head is trained: pass --ckpt (zero-shot is for "
                         "--readout gen)")
    else:  # zero-shot: the untrained model, no LoRA
        cfg = vars(args)
        readout, processor = build(cfg, device, lora=False)
        name = f"{cfg['readout']} zero-shot ({args.split})"
    loader = make_loader(cfg, args.split, processor)
    preds, labels, info = evaluate(readout, loader, device)
    result = summarize(preds, labels, info, cfg["parse_fallback"])
    scored = np.where(np.isnan(preds), cfg["parse_fallback"], preds)
    if args.bootstrap:
        result["ci95"] = bootstrap(scored, labels, args.bootstrap)
    if args.plot:
        plot_predictions(scored, labels, ckpt or ".", args.split)
    return cfg, name, result, scored, labels, [f"{r['video_id']}/{r['clip_id']}" for r in loader.dataset.rows]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="checkpoint folder written by train.py; its config.json then "
                                                "defines the run and the run flags below are ignored, but --device")
    p.add_argument("--compare", nargs=2, default=None, metavar=("CKPT_A", "CKPT_B"),
                   help="evaluate two checkpoints on the same clips and test the difference, clip by clip")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="split to evaluate")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="95%% intervals for MAE, Corr, Acc2_non0, Acc7 from N resamplings of the clips (seed 0)")
    p.add_argument("--plot", action="store_true", help="write <split>_scatter.png and <split>_confusion.png into "
                                                       "the checkpoint folder (needs matplotlib)")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    add_run_args(p)
    args = p.parse_args()
    device = torch.device(args.device)
    if args.compare:
        (cfg_a, name_a, result_a, preds_a, labels, ids_a), (cfg_b, name_b, result_b, preds_b, _, ids_b) = \
            [run_split(ckpt, args, device) for ckpt in args.compare]
        if data_root(cfg_a["data"]).resolve() != data_root(cfg_b["data"]).resolve() or ids_a != ids_b:
            raise CheckpointError(f"--compare: {args.compare[0]} ({cfg_a['data']}, {len(ids_a)} clips) and "
                                  f"{args.compare[1]} ({cfg_b['data']}, {len(ids_b)} clips) are not evaluated on the "
                                  f"same clips of the {args.split!r} split")
        print(format_table({f"A: {name_a}": result_a, f"B: {name_b}": result_b}))
        c = paired(preds_a, preds_b, labels)
        print(f"paired over {c['n']} clips, |error of A| - |error of B|: mean {c['mean_abs_error_diff']:+.4f}, 95% "
              f"bootstrap CI [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]; permutation test p = {c['p_value']:.4f} "
              f"({c['permutations']} sign flips); A closer on {c['a_closer']:.1%} of clips, B on {c['b_closer']:.1%}")
        result = dict(a=dict(ckpt=args.compare[0], **result_a), b=dict(ckpt=args.compare[1], **result_b), paired=c)
    else:
        cfg, name, result, _, labels, _ = run_split(args.ckpt, args, device)
        report(name, result, mean_baseline(cfg, labels))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    try:
        main()
    except (DataError, CheckpointError) as e:
        raise SystemExit(f"error: {e}")
