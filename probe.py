"""Which layer to read, without training once per layer: the frozen backbone runs once over train, valid and
test; a closed-form ridge readout is fitted on each layer's pooled states (last token and mean) of the train
split, its strength chosen on valid, and its valid and test MAE are written by layer (a table and a plot).

    python probe.py --model tiny --data toy --modalities t
    python probe.py --model $SMOL --data ../shared/data/mosi_text --modalities t --out runs/probe-smollm2

An analysis script beside the six modules, as bench.py is: nothing imports it.
"""

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from batches import autocast, make_loader, to_device
from data import SPLITS, Clips
from eval import metrics, table
from readout import at_last_token, build
from settings import Setting, grouped
from train import command
from util import UserError

STRENGTHS = [10.0**k for k in range(-3, 6)]  # ridge strengths tried, on standardised states


def ridge(x, y, strength):
    """Weights w and bias b minimising |x w + b - y|^2 + strength |w|^2 (x centred, the bias not penalised)."""
    mean_x, mean_y = x.mean(0), y.mean()
    xc = x - mean_x
    w = np.linalg.solve(xc.T @ xc + strength * np.eye(x.shape[1]), xc.T @ (y - mean_y))
    return w, mean_y - mean_x @ w


@torch.no_grad()
def states(readout, loader, device):
    """Every layer's pooled states of a split -> ({pooling: (clips, layers + 1, H)}, labels)."""
    pooled, labels = {"last": [], "mean": []}, []
    model = readout.text_model()
    for batch in tqdm(loader, desc="states", leave=False, disable=None):
        batch = to_device(batch, device)
        mask = batch["inputs"]["attention_mask"]
        with autocast(device):
            out = model(
                **batch["inputs"],
                **readout.model_kwargs,
                use_cache=False,
                output_hidden_states=True,
            )
        h = torch.stack(out.hidden_states, 1).float()  # (B, layers + 1, L, H)
        pooled["last"].append(
            torch.stack([at_last_token(h[:, i], mask) for i in range(h.shape[1])], 1)
        )
        weights = (mask / mask.sum(1, keepdim=True))[:, None, :, None]
        pooled["mean"].append((h * weights).sum(2))
        labels.append(batch["label"])
    return {k: torch.cat(v).cpu().numpy() for k, v in pooled.items()}, torch.cat(
        labels
    ).cpu().numpy()


def probe(cfg):
    """{pooling: [{layer, strength, valid MAE, test MAE, test Corr}, ...]}."""
    device = torch.device(cfg.device)
    readout, processor = build(cfg.but(readout="disc"), device, lora=False)
    readout.eval()
    split = {s: states(readout, make_loader(cfg, Clips(cfg, s), processor), device) for s in SPLITS}
    rows = {}
    for pooling in ("last", "mean"):
        x = {s: split[s][0][pooling] for s in SPLITS}
        y = {s: split[s][1] for s in SPLITS}
        rows[pooling] = []
        for layer in range(x["train"].shape[1]):
            mean, std = x["train"][:, layer].mean(0), x["train"][:, layer].std(0) + 1e-6
            z = {
                s: (x[s][:, layer] - mean) / std for s in SPLITS
            }  # standardised on the train split
            fits = [(strength, ridge(z["train"], y["train"], strength)) for strength in STRENGTHS]
            scores = [
                (metrics(z["valid"] @ w + b, y["valid"])["MAE"], s, w, b) for s, (w, b) in fits
            ]
            valid, strength, w, b = min(scores, key=lambda t: t[0])
            test = metrics(z["test"] @ w + b, y["test"])
            rows[pooling].append(
                dict(
                    layer=layer,
                    strength=strength,
                    valid_MAE=valid,
                    MAE=test["MAE"],
                    Corr=test["Corr"],
                )
            )
    return rows


def plot(rows, file, title):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for pooling, runs in rows.items():
        layers = [r["layer"] for r in runs]
        ax.plot(layers, [r["valid_MAE"] for r in runs], "o-", label=f"{pooling} token(s), valid")
        ax.plot(layers, [r["MAE"] for r in runs], "s--", label=f"{pooling} token(s), test")
    ax.set(xlabel="layer (0: embeddings)", ylabel="MAE of a ridge readout", title=title)
    ax.legend(fontsize=8)
    fig.savefig(file, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    # probe.py's own: where the table goes (it trains nothing: no --resume or --overwrite)
    out = Setting(
        "out", str, None, "the folder of the table and the plot (default: runs/DATA-probe)"
    )
    cmd = command(argv, grouped("this command", out), __doc__)
    cfg = cmd.settings(cmd.parse(argv))
    out = Path(cfg.out or f"runs/{Path(cfg.data.replace(':', '')).name}-probe")
    rows = probe(cfg)
    lines = []
    for pooling, runs in rows.items():
        best = min(runs, key=lambda r: r["valid_MAE"])
        named = {
            f"layer {r['layer']}" + (" (valid's choice)" if r is best else ""): [r] for r in runs
        }
        lines.append(
            f"**{pooling} token(s) pooled, {cfg.data}**\n\n"
            + table(named, ("valid_MAE", "MAE", "Corr"), "layer")
        )
    markdown = "\n\n".join(lines)
    print(markdown)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.md").write_text(markdown + "\n")
    (out / "probe.json").write_text(
        json.dumps(dict(settings={k: str(v) for k, v in vars(cfg).items()}, rows=rows), indent=2)
    )
    plot(rows, out / "probe.png", f"{Path(cfg.model).name}: ridge readout by layer")
    print(f"written: {out / 'probe.md'}, {out / 'probe.json'}, {out / 'probe.png'}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
