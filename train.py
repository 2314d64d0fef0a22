"""Train a readout with QLoRA on a (4-bit) Qwen2.5-Omni Thinker or text model; keep the epoch with the best
validation MAE.

    python train.py --model tiny --data toy            # offline, a few minutes on CPU
    python train.py --readout disc --data mosi         # Qwen2.5-Omni-7B on $MSA_DATA/MOSI, one GPU
    python train.py --model PATH --data DIR --modalities t   # any local text model folder, transcripts only
    torchrun --nproc_per_node 4 train.py --data mosei        # data parallel: one process per GPU (gloo on CPU)

Writes a checkpoint folder (--out): config.json, weights.safetensors (LoRA and head of the best epoch),
last.safetensors (the end of the latest epoch, with optimizer and random-number states: `--resume DIR`
continues from it), log.jsonl, metrics.json (valid and test of the kept epoch, and the train-mean baseline).
"""
import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from data import SPLITS, CheckpointError, DataError, load_clips, make_loader, to_device
from eval import (add_run_args, evaluate, load_weights, mean_baseline, pyplot, read_weights, report,
                  seed_table, summarize, trained_state)
from lora import count_parameters
from readout import build

# Defaults by backbone: a random tiny model needs many more steps at a larger rate than a pretrained 7B
# one. LoRA r=32 on the 7B Thinker trains 80.7 M of its 8.93 B parameters (0.90%). Flags given win.
PRESETS = {"tiny": dict(epochs=30, lr=2e-3, batch_size=8, grad_accum=1, lora_r=16),
           "pretrained": dict(epochs=5, lr=1e-4, batch_size=4, grad_accum=4, lora_r=32)}


def lr_at(step, total, warmup, peak):
    """Linear warm-up to `peak`, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def setup_distributed(cfg):
    """(rank, world size) under torchrun (WORLD_SIZE > 1): one GPU per process, only rank 0 prints. A plain
    run sets nothing up: (0, 1). The process group itself is started by start_group()."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if cfg["device"].startswith("cuda"):
        cfg["device"] = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(cfg["device"])
    if int(os.environ["RANK"]) > 0:
        sys.stdout = open(os.devnull, "w")
    return int(os.environ["RANK"]), world


def start_group(cfg):
    """The process group: NCCL on GPUs, gloo on CPU. Started after the model is built, since transformers'
    save_pretrained (used to build the tiny model) writes on rank 0 only once a group exists."""
    dist.init_process_group("nccl" if cfg["device"].startswith("cuda") else "gloo")


def average_gradients(params, world):
    """Gradients averaged over the processes, in one all-reduce (what DistributedDataParallel does, without
    its wrapper, so that any readout's loss() works unchanged)."""
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).clone()


def evaluate_all(readout, loader, device, world):
    """evaluate() on this rank's share of a split, gathered in the split's order on every rank."""
    preds, labels, info = evaluate(readout, loader, device)
    if world == 1:
        return preds, labels, info
    parts = [None] * world
    dist.all_gather_object(parts, (list(loader.sampler), preds, labels, info))
    n = sum(len(idx) for idx, *_ in parts)
    all_preds, all_labels = np.empty(n, dtype=preds.dtype), np.empty(n, dtype=labels.dtype)
    for idx, p, y, _ in parts:
        all_preds[idx], all_labels[idx] = p, y
    infos = [i for *_, i in parts]
    merged = {k: sum(i[k] for i in infos) for k in infos[0] if k != "ms_per_clip"}
    merged["ms_per_clip"] = float(np.mean([i["ms_per_clip"] for i in infos]))
    return all_preds, all_labels, merged


def train(cfg):
    """Train the run `cfg` describes (a dict of every flag); returns (checkpoint folder, metrics). With
    cfg['resume'] set, continue from the last.safetensors in cfg['out']. Under torchrun, every process runs
    this; rank 0 alone writes."""
    rank, world = setup_distributed(cfg)
    main = rank == 0
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    device = torch.device(cfg["device"])
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    clips = {split: load_clips(cfg, split) for split in SPLITS}  # a bad input stops the run before the model loads
    readout, processor = build(cfg, device)
    if world > 1:
        start_group(cfg)
    if cfg["grad_ckpt"]:
        readout.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in readout.parameters() if p.requires_grad]
    cfg["parameters"] = count_parameters(readout)
    print(f"trainable {cfg['parameters']['trainable']:,} of {cfg['parameters']['total']:,} parameters "
          f"({cfg['parameters']['trainable_pct']:.2f}%)")

    train_loader = make_loader(cfg, "train", processor, cfg["batch_size"], shuffle=True, seed=cfg["seed"],
                               drop_last=True, clips=clips["train"], rank=rank, world=world)  # a batch norm needs 2
    valid_loader = make_loader(cfg, "valid", processor, clips=clips["valid"], rank=rank, world=world)
    test_loader = make_loader(cfg, "test", processor, clips=clips["test"], rank=rank, world=world)
    print(f"effective batch: {cfg['batch_size']} clips x {world} process(es) x {cfg['grad_accum']} accumulation "
          f"steps = {cfg['batch_size'] * world * cfg['grad_accum']} clips per optimizer step")
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    total = cfg["epochs"] * math.ceil(len(train_loader) / cfg["grad_accum"])
    warmup = max(1, round(cfg["warmup_ratio"] * total))
    autocast = dict(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    prepare_loader = make_loader(cfg, "train", processor, cfg["batch_size"], clips=clips["train"])  # for prepare()

    best_valid = None  # the best epoch's validation metrics, reported as they are (not evaluated again)
    if cfg["resume"]:
        start, step, best = load_last(out / "last.safetensors", readout, optimizer, train_loader)
        lines = (out / "log.jsonl").read_text().splitlines() if (out / "log.jsonl").exists() else []
        log = open(out / "log.jsonl" if main else os.devnull, "w")  # drop what the interrupted epoch logged
        log.writelines(line + "\n" for line in lines if json.loads(line).get("epoch", 0) <= start)
        print(f"resuming {out} after epoch {start} (best valid MAE so far {best:.4f})")
    else:
        start, step, best = 0, 0, float("inf")
        if main:
            (out / "config.json").write_text(json.dumps(cfg, indent=2))
        log = open(out / "log.jsonl" if main else os.devnull, "w")
        log.write(json.dumps(dict(data={split: dict(clips=len(c), skipped=c.skip_counts(),
                                                    empty_transcripts=c.empty_transcripts)
                                        for split, c in clips.items()})) + "\n")
    for epoch in range(start, cfg["epochs"]):
        readout.train()
        started, losses, waited = time.time(), [], 0.0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg['epochs']}", leave=False, disable=None if main else True)
        ready = time.perf_counter()
        for i, batch in enumerate(bar):
            waited += time.perf_counter() - ready  # the time the loop waited for this batch
            with torch.autocast(**autocast):
                loss = readout.loss(to_device(batch, device))
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the training loss is {loss.item()} at epoch {epoch + 1}, batch {i + 1}: stopped. The end of "
                    f"the last good epoch is in {out / 'last.safetensors'} (continue with --resume {out}, e.g. "
                    f"after lowering --lr), its best epoch in {out / 'weights.safetensors'}")
            (loss / cfg["grad_accum"]).backward()
            losses.append(loss.item())
            if (i + 1) % cfg["grad_accum"] == 0 or i + 1 == len(train_loader):
                average_gradients(params, world)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total, warmup, cfg["lr"])
                torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            ready = time.perf_counter()
        with torch.autocast(**autocast):
            readout.prepare(to_device(b, device) for b in prepare_loader)
        valid = summarize(*evaluate_all(readout, valid_loader, device, world), cfg["parse_fallback"])
        kept = valid["MAE"] < best
        if kept:
            best, best_valid = valid["MAE"], valid
            if main:
                save_atomically(trained_state(readout), out / "weights.safetensors")
        record = dict(epoch=epoch + 1, step=step, lr=optimizer.param_groups[0]["lr"], train_loss=float(np.mean(losses)),
                      valid_MAE=valid["MAE"], valid_Corr=valid["Corr"], kept=kept, seconds=time.time() - started,
                      data_wait_seconds=waited)
        unparsed = f"  unparseable {valid['parse_fail_rate']:.0%}" if "parse_fail_rate" in valid else ""
        if unparsed:
            record["valid_parse_fail_rate"] = valid["parse_fail_rate"]
        log.write(json.dumps(record) + "\n")
        log.flush()
        if main:
            save_last(out / "last.safetensors", readout, optimizer, train_loader, epoch + 1, step, best)
        print(f"epoch {epoch + 1:3d}  loss {record['train_loss']:.4f}  valid MAE {valid['MAE']:.4f}  "
              f"Corr {valid['Corr']:.4f}{unparsed}{'  *' if kept else ''}  ({record['seconds']:.1f}s, "
              f"{waited:.1f}s waiting for data)")
    log.close()

    if world > 1:
        dist.barrier()  # rank 0 has written the best weights
    load_weights(readout, read_weights(out / "weights.safetensors", device), out / "weights.safetensors")
    result = {"valid": best_valid} if best_valid else {}  # none: the best epoch was before a --resume
    for split, loader in (("valid", valid_loader), ("test", test_loader)):
        if split in result:
            continue
        preds, labels, info = evaluate_all(readout, loader, device, world)
        result[split] = summarize(preds, labels, info, cfg["parse_fallback"])
    result["test_mean_baseline"] = mean_baseline(cfg, labels)
    if device.type == "cuda":
        result["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if main:
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        plot_learning_curve(out)
    report(f"{cfg['readout']} (test)", result["test"], result["test_mean_baseline"])
    print(f"test MAE / train-mean MAE = {result['test']['MAE'] / result['test_mean_baseline']['MAE']:.3f}   "
          f"checkpoint: {out}")
    if world > 1:
        dist.destroy_process_group()
    return out, result


def plot_learning_curve(out):
    """learning_curve.png in the checkpoint folder: training loss and validation MAE per epoch."""
    plt = pyplot()
    if plt is None:
        return
    log = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "epoch" in r]
    epochs = [r["epoch"] for r in log]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, [r["train_loss"] for r in log], "o-", label="training loss")
    ax.set(xlabel="epoch", ylabel="training loss", title=out.name)
    right = ax.twinx()
    right.plot(epochs, [r["valid_MAE"] for r in log], "s-", color="tab:orange", label="validation MAE")
    right.set_ylabel("validation MAE")
    fig.legend(loc="upper right", bbox_to_anchor=(0.88, 0.88))
    fig.savefig(out / "learning_curve.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def save_atomically(tensors, file, metadata=None):
    """Write a safetensors file elsewhere, then rename it over `file`: a crash leaves the old one whole."""
    tmp = file.with_name(file.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata)
    os.replace(tmp, file)


def save_last(file, readout, optimizer, loader, epoch, step, best):
    """Everything needed to continue after `epoch`, in one safetensors file: the trained tensors, the optimizer's
    state, the random-number states; the numbers and the optimizer's settings go into its JSON metadata."""
    tensors = {f"model.{k}": v for k, v in trained_state(readout).items()}
    optim = optimizer.state_dict()
    for i, state in optim["state"].items():
        tensors.update({f"optim.{i}.{k}": v for k, v in state.items()})
    tensors["rng.torch"], tensors["rng.loader"] = torch.get_rng_state(), loader.generator.get_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    numpy_state = np.random.get_state()
    meta = dict(epoch=epoch, step=step, best=best, param_groups=optim["param_groups"], python=random.getstate(),
                numpy=[numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]])
    save_atomically(tensors, file, metadata=dict(train=json.dumps(meta)))


def load_last(file, readout, optimizer, loader):
    """Restore what save_last wrote -> (epoch, step, best valid MAE)."""
    if not file.is_file():
        raise CheckpointError(f"{file}: not found (nothing to resume: no epoch of this run has ended)")
    tensors = read_weights(file)  # a clear error for a truncated or foreign file
    with safe_open(file, framework="pt") as f:  # the header alone
        meta = json.loads(f.metadata()["train"])
    load_weights(readout, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, file)
    state = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict(dict(state=state, param_groups=meta["param_groups"]))
    torch.set_rng_state(tensors["rng.torch"])
    loader.generator.set_state(tensors["rng.loader"])
    if "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    name, keys, *rest = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    return meta["epoch"], meta["step"], meta["best"]


def load_config(folder):
    """A checkpoint's config.json, checked against this code's flags: a missing or unknown key or a value of
    the wrong type is an error (the file is data; nothing in it is executed)."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: not found ({folder} is not a checkpoint folder written by train.py)")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: not a JSON object")
    cfg = {"cache_processed": False, **cfg}  # flags added since the checkpoint was written: their default
    reference = {**parse_args(["--model", "tiny"]), "parameters": {}}
    problems = [f"unknown key {k!r}" for k in cfg.keys() - reference.keys()]
    problems += [f"missing key {k!r}" for k in reference.keys() - cfg.keys()]
    for k in cfg.keys() & reference.keys():
        want, got = reference[k], cfg[k]
        ok = (isinstance(got, (str, type(None))) if want is None else
              isinstance(got, bool) if isinstance(want, bool) else
              isinstance(got, (int, float)) and not isinstance(got, bool) if isinstance(want, float) else
              isinstance(got, type(want)) and not isinstance(got, bool))
        if not ok:
            problems.append(f"{k!r} is {got!r}, not a {type(want).__name__ if want is not None else 'str or null'}")
    if problems:
        raise CheckpointError(f"{file}: {'; '.join(sorted(problems))}")
    return cfg


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    p.add_argument("--out", default=None,
                   help="checkpoint folder (default: runs/<data>-<readout>-<modalities>-s<seed>)")
    p.add_argument("--epochs", type=int, default=None, help="default: 30 for tiny, 5 otherwise")
    p.add_argument("--batch_size", type=int, default=None, help="clips per step (default: 8 tiny, 4 otherwise)")
    p.add_argument("--grad_accum", type=int, default=None, help="batches per optimizer step (default: 1 tiny, 4 else)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 2e-3 tiny, 1e-4 otherwise)")
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--warmup_ratio", type=float, default=0.1, help="share of steps with linear warm-up")
    p.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing (less memory, slower)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds: one run each in <out>/s<seed>, then a "
                                                 "table of mean ± std over them (seeds.md, seeds.json)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR from its last.safetensors; its config.json defines the run")
    cfg = vars(p.parse_args(argv))
    preset = PRESETS["tiny" if cfg["model"] == "tiny" else "pretrained"]
    cfg.update({k: v for k, v in preset.items() if cfg[k] is None})
    cfg["lora_alpha"] = cfg["lora_alpha"] or 2.0 * cfg["lora_r"]
    if cfg["out"] is None:
        name = Path(cfg["data"].replace(":", "")).name
        seeds = f"seeds{cfg['seeds'].replace(',', '_')}" if cfg["seeds"] else f"s{cfg['seed']}"
        cfg["out"] = f"runs/{name}-{cfg['readout']}-{cfg['modalities']}-{seeds}"
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    if cfg["resume"]:  # the folder's config.json defines the run, not the other flags
        cfg = {**load_config(cfg["resume"]), "resume": cfg["resume"], "out": cfg["resume"]}
    if not cfg["seeds"]:
        return train(cfg)
    out, runs = Path(cfg["out"]), {}
    for seed in map(int, cfg["seeds"].split(",")):
        runs[f"s{seed}"] = train({**cfg, "seed": seed, "seeds": None, "out": str(out / f"s{seed}")})[1]["test"]
    title = f"{cfg['readout']} on {cfg['data']} ({cfg['modalities']}), test split, seeds {cfg['seeds']}"
    markdown = seed_table(title, {"mean ± std": list(runs.values())}) + "\n\n" + seed_table("each seed", {
        name: [r] for name, r in runs.items()}, "seed")
    print(markdown)
    (out / "seeds.md").write_text(markdown + "\n")
    (out / "seeds.json").write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    try:
        main()
    except (DataError, CheckpointError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}")
