"""Train a readout with QLoRA, keep the epoch with the best validation MAE; --resume continues a stopped run.

python train.py --model tiny --data toy                  # offline, about 2 minutes on 2 CPU cores
python train.py --readout disc --data mosi               # Qwen2.5-Omni-7B on $MSA_DATA/MOSI, one GPU
torchrun --nproc_per_node 4 train.py --data mosei        # data parallel: one process per GPU (gloo on CPU)
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm import tqdm

from data import SPLITS, UserError, load_clips, make_loader, to_device, write_atomically
from eval import (
    Help,
    evaluate,
    load_config,
    load_weights,
    machine_flags,
    mean_baseline,
    read_tensors,
    report,
    resolve,
    run_config,
    run_flags,
    save_json,
    save_tensors,
    trained_state,
)
from lora import count_parameters
from readout import build


def lr_at(step, total, warmup, peak):
    """Linear warm-up to `peak`, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(cfg):
    """Train the run `cfg` describes -> (folder, metrics). Under torchrun every process runs it; rank 0 writes."""
    rank, world = distributed(cfg)
    torch.manual_seed(cfg["seed"])
    device, out = torch.device(cfg["device"]), Path(cfg["out"])
    clips = {
        split: load_clips(cfg, split) for split in SPLITS
    }  # a bad input stops the run before the model loads
    readout, processor = build(cfg, device)
    if (
        world > 1
    ):  # after the model: transformers' save_pretrained (the tiny model) writes on rank 0 alone once
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo"
        )  # a process group exists
    if cfg["grad_ckpt"]:
        readout.backbone.activation_checkpointing_enable({"use_reentrant": False})
    counts = count_parameters(readout)
    print(
        f"trainable {counts['trainable']:,} of {counts['total']:,} parameters ({counts['trainable_pct']:.2f}%)"
    )
    # float32: the weights (4 bytes a value) and last.safetensors (with AdamW's two moments, 12), twice while replaced
    need = 28 * counts["trainable"] + 2**20
    free = shutil.disk_usage(next(p for p in [out, *out.parents] if p.exists())).free
    if need > free:
        raise UserError(
            f"{out}: the checkpoint files need about {need / 2**20:.1f} MiB, {free / 2**20:.1f} free"
        )
    loader = make_loader(
        cfg,
        clips["train"],
        processor,
        cfg["batch_size"],
        shuffle=True,
        seed=cfg["seed"],
        drop_last=True,
        rank=rank,
        world=world,
    )  # drop_last: a batch norm needs two clips
    valid = make_loader(cfg, clips["valid"], processor, rank=rank, world=world)
    in_order = make_loader(
        cfg, clips["train"], processor, cfg["batch_size"]
    )  # for readout.prepare()
    print(
        f"effective batch: {cfg['batch_size']} clips x {world} process(es) x {cfg['grad_accum']} accumulation "
        f"steps = {cfg['batch_size'] * world * cfg['grad_accum']} clips per optimizer step"
    )
    optimizer = torch.optim.AdamW(
        [p for p in readout.parameters() if p.requires_grad],
        lr=cfg["lr"],
        weight_decay=cfg["weight_decay"],
    )
    log, start, step = (
        [
            dict(
                data={
                    s: dict(
                        clips=len(c), skipped=c.skip_counts(), empty_transcripts=c.empty_transcripts
                    )
                    for s, c in clips.items()
                }
            )
        ],
        0,
        0,
    )
    if cfg["resume"]:
        start, step = load_last(out / "last.safetensors", readout, optimizer, loader)
        log = [
            r
            for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
            if r.get("epoch", 0) <= start
        ]
        print(f"resuming {out} after epoch {start}")
    for epoch in range(start + 1, cfg["epochs"] + 1):
        started = time.time()
        train_loss, step, waited = train_epoch(readout, loader, optimizer, cfg, epoch, step, world)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            readout.prepare(to_device(b, device) for b in in_order)
        result = evaluate(readout, valid, device, cfg["parse_fallback"])[0]
        improved = result["MAE"] < min(
            (r["valid"]["MAE"] for r in log[1:]), default=math.inf
        )  # best so far
        log.append(
            dict(
                epoch=epoch,
                step=step,
                lr=optimizer.param_groups[0]["lr"],
                train_loss=train_loss,
                improved=improved,
                seconds=time.time() - started,
                data_wait_seconds=waited,
                valid=result,
            )
        )
        if (
            rank == 0
        ):  # in this order, so that a crash anywhere leaves a folder that --resume continues
            if improved:
                save_tensors(out / "weights.safetensors", trained_state(readout))
            if epoch == 1:
                save_json(out / "config.json", run_config(cfg))
            write_atomically(out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in log).encode())
            save_last(out / "last.safetensors", readout, optimizer, loader, epoch, step)
        unparsed = (
            f"  unparseable {result['parse_fail_rate']:.0%}" if "parse_fail_rate" in result else ""
        )
        print(
            f"epoch {epoch:3d}  loss {train_loss:.4f}  valid MAE {result['MAE']:.4f}  Corr {result['Corr']:.4f}"
            f"{unparsed}{'  *' if improved else ''}  ({log[-1]['seconds']:.1f}s, {waited:.1f}s waiting for data)"
        )
    return finish(cfg, out, readout, processor, clips["test"], log, counts, rank, world)


def train_epoch(readout, loader, optimizer, cfg, epoch, step, world):
    """One pass over the training batches -> (mean loss, optimizer steps so far, seconds spent waiting for data)."""
    readout.train()
    device, params = (
        torch.device(cfg["device"]),
        [p for g in optimizer.param_groups for p in g["params"]],
    )
    total = cfg["epochs"] * math.ceil(len(loader) / cfg["grad_accum"])
    losses, waited, ready = [], 0.0, time.perf_counter()
    bar = tqdm(
        loader,
        desc=f"epoch {epoch}/{cfg['epochs']}",
        leave=False,
        disable=os.environ.get("RANK", "0") != "0",
    )
    for i, batch in enumerate(bar):
        waited += time.perf_counter() - ready
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = readout.loss(to_device(batch, device))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the training loss is {loss.item()} at epoch {epoch}, batch {i + 1}: stopped; "
                f"--resume {cfg['out']} continues after the last good epoch (lower --lr?)"
            )
        (loss / cfg["grad_accum"]).backward()
        losses.append(loss.item())
        if (i + 1) % cfg["grad_accum"] == 0 or i + 1 == len(loader):
            if (
                world > 1
            ):  # what DistributedDataParallel does, without its wrapper: any readout's loss() works
                flat = torch.cat(
                    [
                        p.grad.flatten() if p.grad is not None else p.new_zeros(p.numel())
                        for p in params
                    ]
                )
                dist.all_reduce(flat)
                for p, g in zip(params, (flat / world).split([p.numel() for p in params])):
                    p.grad = g.view_as(p).clone()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(
                    step, total, max(1, round(cfg["warmup_ratio"] * total)), cfg["lr"]
                )
            torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        ready = time.perf_counter()
    return float(np.mean(losses)), step, waited


def finish(cfg, out, readout, processor, test_clips, log, counts, rank, world):
    """The kept epoch's weights on the test split -> (folder, metrics), metrics.json written."""
    device = torch.device(cfg["device"])
    if world > 1:
        dist.barrier()  # rank 0 has written the best weights
    kept = min(log[1:], key=lambda r: r["valid"]["MAE"])
    load_weights(
        readout, read_tensors(out / "weights.safetensors", device), out / "weights.safetensors"
    )
    test, _, labels = evaluate(
        readout,
        make_loader(cfg, test_clips, processor, rank=rank, world=world),
        device,
        cfg["parse_fallback"],
    )
    result = dict(
        valid=kept["valid"],
        test=test,
        test_mean_baseline=mean_baseline(cfg, labels),
        kept_epoch=kept["epoch"],
        parameters=counts,
    )
    if device.type == "cuda":
        result["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if rank == 0:
        save_json(out / "metrics.json", result)
    report(
        f"{cfg['readout']} ({cfg['modalities']}, test)",
        result["test"],
        result["test_mean_baseline"],
    )
    print(
        f"test MAE / train-mean MAE = {result['test']['MAE'] / result['test_mean_baseline']['MAE']:.3f}   "
        f"kept epoch {kept['epoch']}   checkpoint: {out}"
    )
    if world > 1:
        dist.destroy_process_group()
    return out, result


def distributed(cfg):
    """(rank, world size) of this process: under torchrun one GPU each, and rank 0 alone prints."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and cfg["device"].startswith("cuda"):
        cfg["device"] = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(cfg["device"])
    if rank > 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the whole run)
    return rank, world


def save_last(file, readout, optimizer, loader, epoch, step):
    """What continuing after `epoch` needs: trained tensors, optimizer state, random states; the rest as metadata."""
    tensors = {f"model.{k}": v for k, v in trained_state(readout).items()}
    state = optimizer.state_dict()
    tensors.update({f"optim.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()})
    tensors.update({"rng.torch": torch.get_rng_state(), "rng.loader": loader.generator.get_state()})
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_tensors(
        file,
        tensors,
        {"train": json.dumps(dict(epoch=epoch, step=step, param_groups=state["param_groups"]))},
    )


def load_last(file, readout, optimizer, loader):
    """Restore what save_last wrote -> (epoch, step)."""
    tensors = read_tensors(file)  # a clear error for a missing, truncated or foreign file
    with safe_open(file, framework="pt") as f:
        meta = json.loads(f.metadata()["train"])
    load_weights(readout, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, file)
    state = {}
    for k, v in tensors.items():
        if k.startswith("optim."):  # optim.<parameter index>.<state name>
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict(dict(state=state, param_groups=meta["param_groups"]))
    torch.set_rng_state(tensors["rng.torch"])
    loader.generator.set_state(tensors["rng.loader"])
    if "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta["epoch"], meta["step"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    run_flags(p)
    machine = p.add_argument_group(
        "this machine (not saved with the run; --resume takes them from this command)"
    )
    machine_flags(machine)
    machine.add_argument(
        "--grad_ckpt", action="store_true", help="activation checkpointing: less memory, slower"
    )
    p.add_argument(
        "--out", help="the checkpoint folder (default: runs/DATA-READOUT-MODALITIES-sSEED)"
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the run in DIR from its last finished epoch",
    )
    cfg = resolve(vars(p.parse_args(argv)))
    data = Path(cfg["data"].replace(":", "")).name
    cfg["out"] = cfg["out"] or f"runs/{data}-{cfg['readout']}-{cfg['modalities']}-s{cfg['seed']}"
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    if cfg["resume"]:  # the folder's config.json defines the run; this command line, the machine
        cfg = {**cfg, **load_config(cfg["resume"]), "out": cfg["resume"]}
    return train(cfg)


if __name__ == "__main__":
    try:
        main()
    except (UserError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None
