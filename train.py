"""Train a readout with QLoRA, keep the epoch with the best validation MAE; --resume continues a stopped run.

python train.py --model tiny --data toy                  # offline, about 2 minutes on 2 CPU cores
python train.py --readout disc --data mosi               # Qwen2.5-Omni-7B on $MSA_DATA/MOSI, one GPU
torchrun --nproc_per_node 4 train.py --data mosei        # data parallel: one process per GPU
"""

import quickhelp

import argparse
import fcntl
import json
import math
import os
import shutil
import signal
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
    RECIPES,
    RUN_FILES,
    Help,
    autocast,
    check_device,
    check_values,
    evaluate,
    given_flags,
    load_config,
    load_weights,
    machine_flags,
    mean_baseline,
    read_log,
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
from readout import build, check_model

STOPS = (signal.SIGINT, signal.SIGTERM)  # what stops a run: Ctrl-C, SIGTERM


def lr_at(step, total, warmup, peak):
    """Linear warm-up to `peak`, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(cfg):
    """Train the run `cfg` describes -> (folder, metrics). Under torchrun every process runs it; rank 0
    writes. The folder is locked while it trains; what it holds is always a whole epoch's state."""
    rank, world = distributed(cfg)
    # a SIGTERM stops as Ctrl-C does (also where a shell started the run ignoring Ctrl-C)
    for s in STOPS:
        signal.signal(s, signal.default_int_handler)
    torch.manual_seed(cfg["seed"])
    out = Path(cfg["out"])
    # What can be known before the clips are decoded: the folder, the device, the model's configuration
    check_device(cfg["device"])
    check_model(cfg)
    lock = hold(out, cfg, rank)
    try:
        # a bad input stops the run here, before the model loads
        clips = {split: load_clips(cfg, split) for split in SPLITS}
        if len(clips["train"]) < cfg["batch_size"] * world:
            raise UserError(
                f"--data {cfg['data']}: {len(clips['train'])} training clips, fewer than one batch "
                f"(--batch_size {cfg['batch_size']} x {world} process(es)): no optimizer step"
            )
        return train_loaded(cfg, clips, rank, world)
    except KeyboardInterrupt:
        kept = kept_so_far(out, f"python train.py --resume {out} continues")
        raise UserError(f"interrupted (Ctrl-C or SIGTERM): {kept}") from None
    except FloatingPointError as e:
        # the same settings diverge again, resumed or not
        kept = kept_so_far(out, "--overwrite replaces it")
        raise UserError(
            f"{e}: stopped, nothing of it saved; {kept}; train again with a lower --lr"
        ) from None
    finally:
        release(lock, out)


def train_loaded(cfg, clips, rank, world):
    device, out = torch.device(cfg["device"]), Path(cfg["out"])
    readout, processor = build(cfg, device)
    if world > 1:  # after the model: transformers' save_pretrained (the tiny model) on rank 0 alone
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg["grad_ckpt"]:
        checkpoint_trained_layers(readout.backbone)
    counts = count_parameters(readout)
    print(
        f"trainable {counts['trainable']:,} of {counts['total']:,} parameters "
        f"({counts['trainable_pct']:.2f}%)"
    )
    check_space(out, counts["trainable"])
    loader = make_loader(
        cfg, clips["train"], processor, cfg["batch_size"], True, cfg["seed"], rank, world
    )  # shuffled by the run's seed; this rank's part of each batch
    valid = make_loader(cfg, clips["valid"], processor)
    in_order = make_loader(cfg, clips["train"], processor, cfg["batch_size"])  # for prepare()
    print(
        f"effective batch: {cfg['batch_size']} clips x {world} process(es) x {cfg['grad_accum']} "
        f"accumulation steps = {cfg['batch_size'] * world * cfg['grad_accum']} clips per optimizer step"
    )
    optimizer = torch.optim.AdamW(param_groups(readout, cfg), weight_decay=cfg["weight_decay"])
    log = [dict(data={s: c.counts() for s, c in clips.items()})]
    start, step = 0, 0
    if cfg["resume"]:
        start, step = load_last(out / "last.safetensors", readout, optimizer, loader)
        log = [r for r in read_log(out) if r.get("epoch", 0) <= start]
        print(f"resuming {out} after epoch {start}")
    for epoch in range(start + 1, cfg["epochs"] + 1):
        started = time.time()
        train_loss, step, waited, padded = train_epoch(
            readout, loader, optimizer, cfg, epoch, step, rank, world
        )
        with autocast(device):
            readout.prepare(to_device(b, device) for b in in_order)
        result = evaluate(readout, valid, device)[0]
        # below every earlier epoch's validation MAE
        improved = result["MAE"] < min((r["valid"]["MAE"] for r in log[1:]), default=math.inf)
        log.append(
            dict(
                epoch=epoch,
                step=step,
                train_loss=train_loss,
                improved=improved,
                seconds=time.time() - started,
                data_wait_seconds=waited,
                padding_share=padded,
                valid=result,
            )
        )
        if rank == 0:
            save_epoch(cfg, readout, optimizer, loader, log, improved)
        say(log[-1])
    return finish(cfg, readout, processor, clips["test"], log, counts, rank, world)


def checkpoint_trained_layers(backbone):
    """Activation checkpointing in the layers that hold a trained parameter: a frozen tower builds no graph,
    so recomputing it would buy nothing (unless LoRA reaches into it, as the paper's target names do)."""
    backbone.activation_checkpointing_enable({"use_reentrant": False})
    for m in backbone.modules():
        if getattr(m, "gradient_checkpointing", False):
            m.gradient_checkpointing = any(p.requires_grad for p in m.parameters())


def say(r):
    """An epoch's line of the log, printed."""
    unparsed = ""
    if "parse_fail_rate" in r["valid"]:
        unparsed = f"  unparseable {r['valid']['parse_fail_rate']:.0%}"
    star = "  *" if r["improved"] else ""
    print(
        f"epoch {r['epoch']:3d}  loss {r['train_loss']:.4f}  valid MAE {r['valid']['MAE']:.4f}  Corr "
        f"{r['valid']['Corr']:.4f}{unparsed}{star}  ({r['seconds']:.1f}s, {r['data_wait_seconds']:.1f}s "
        f"waiting for data, padding {r['padding_share']:.0%})"
    )


def train_epoch(readout, loader, optimizer, cfg, epoch, step, rank, world):
    """One pass over the training batches -> (mean loss, optimizer steps so far, seconds waiting for data,
    the mean share of padding in a batch's tokens)."""
    readout.train()
    device = torch.device(cfg["device"])
    params = [p for g in optimizer.param_groups for p in g["params"]]
    total = cfg["epochs"] * math.ceil(len(loader) / cfg["grad_accum"])
    warmup = max(1, round(cfg["warmup_ratio"] * total))
    losses, padded, waited, ready = [], [], 0.0, time.perf_counter()
    # rank 0 alone shows it
    bar = tqdm(loader, desc=f"epoch {epoch}/{cfg['epochs']}", leave=False, disable=rank > 0)
    for i, batch in enumerate(bar):
        waited += time.perf_counter() - ready
        padded.append(1 - batch["inputs"]["attention_mask"].float().mean().item())
        with autocast(device):
            loss = readout.loss(to_device(batch, device))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the training loss is {loss.item()} at epoch {epoch}, batch {i + 1}"
            )
        (loss / cfg["grad_accum"]).backward()
        losses.append(loss.item())
        if (i + 1) % cfg["grad_accum"] == 0 or i + 1 == len(loader):
            if world > 1:
                average_gradients(params, world)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, group["peak"])
            norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
            if not torch.isfinite(norm):
                raise FloatingPointError(
                    f"the gradient norm is {norm.item()} at epoch {epoch}, batch {i + 1}"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        ready = time.perf_counter()
    return np.mean(losses), step, waited, np.mean(padded)  # numpy floats are floats (JSON)


def param_groups(readout, cfg):
    """LoRA's parameters at --lr, the readout's own (a head) at --head_lr where it has that flag; one group
    for each learning rate, its peak kept for the schedule."""
    groups = {}
    for name, p in readout.named_parameters():
        if p.requires_grad:
            lr = cfg["lr"] if name.startswith("backbone.") else cfg.get("head_lr") or cfg["lr"]
            groups.setdefault(lr, []).append(p)
    return [dict(params=params, lr=lr, peak=lr) for lr, params in groups.items()]


def average_gradients(params, world):
    """What DistributedDataParallel does, without its wrapper: any readout's loss() works."""
    grads = [p.grad.flatten() if p.grad is not None else p.new_zeros(p.numel()) for p in params]
    flat = torch.cat(grads)
    dist.all_reduce(flat)
    for p, g in zip(params, (flat / world).split([p.numel() for p in params])):
        p.grad = g.view_as(p).clone()


def save_epoch(cfg, readout, optimizer, loader, log, improved):
    """The end of an epoch, in this order, so that a crash anywhere leaves a folder that --resume continues;
    nothing that is not finite is written, and a stop waits until the epoch is saved whole."""
    out, epoch, step = Path(cfg["out"]), log[-1]["epoch"], log[-1]["step"]
    state = trained_state(readout)
    broken = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if broken:
        raise FloatingPointError(
            f"after epoch {epoch}, {len(broken)} trained tensors are not finite"
        )
    asked = []  # a Ctrl-C or SIGTERM meanwhile stops the run once the epoch's files are all written
    for s in STOPS:
        signal.signal(s, lambda *_: asked.append(1))
    try:
        if improved:
            save_tensors(out / "weights.safetensors", state)
        if epoch == 1:
            save_json(out / "config.json", run_config(cfg))
        write_atomically(out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in log).encode())
        save_last(out / "last.safetensors", readout, optimizer, loader, epoch, step)
    finally:
        for s in STOPS:  # as train() set them
            signal.signal(s, signal.default_int_handler)
    if asked:
        raise KeyboardInterrupt


def finish(cfg, readout, processor, test_clips, log, counts, rank, world):
    """The kept epoch's weights on the test split -> (folder, metrics), metrics.json written."""
    device, out = torch.device(cfg["device"]), Path(cfg["out"])
    if world > 1:
        dist.barrier()  # rank 0 has written the best weights
    kept = min(log[1:], key=lambda r: r["valid"]["MAE"])
    weights = out / "weights.safetensors"
    load_weights(readout, read_tensors(weights, device), weights)
    test, _, labels = evaluate(readout, make_loader(cfg, test_clips, processor), device)
    baseline = mean_baseline(cfg, labels)
    result = dict(
        valid=kept["valid"],
        test=test,
        test_mean_baseline=baseline,
        kept_epoch=kept["epoch"],
        parameters=counts,
    )
    if device.type == "cuda":
        result["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if rank == 0:
        save_json(out / "metrics.json", result)
    report(f"{cfg['readout']} ({cfg['modalities']}, test)", test, baseline)
    print(
        f"test MAE / train-mean MAE = {test['MAE'] / baseline['MAE']:.3f}   kept epoch {kept['epoch']}   "
        f"checkpoint: {out}"
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


def hold(out, cfg, rank):
    """Lock the run's folder (made here) for this process, after checking that training into it is
    what the user asked for -> the lock (None on ranks > 0, which write nothing)."""
    if rank > 0:
        return None
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = os.open(out, os.O_RDONLY)  # the folder itself is locked: nothing is left in it
    except OSError as e:
        raise UserError(f"--out {out}: cannot be used ({e.strerror or e})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise UserError(f"--out {out}: another process is training into this folder now") from None
    holds = [f for f in RUN_FILES if (out / f).exists()]
    if holds and not (cfg["resume"] or cfg["overwrite"]):
        release(lock, out)
        raise UserError(
            f"--out {out}: holds a run already ({', '.join(holds)}); --resume {out} continues it, "
            "another --out trains elsewhere, --overwrite replaces it"
        )
    if cfg["overwrite"] and not cfg["resume"]:  # the run's own files, not the folder
        for pattern in (*RUN_FILES, "*.png", "test@*.json"):
            for file in out.glob(pattern):
                file.unlink()
    return lock


def release(lock, out):
    """Unlock the folder; an empty one goes (a run that ends before its first epoch leaves nothing)."""
    if lock is None:
        return
    os.close(lock)
    if not any(out.iterdir()):
        out.rmdir()


def kept_so_far(out, then):
    """What a stopped run leaves, in words, and `then`: what to do with it, if it is anything."""
    file = out / "last.safetensors"
    if not file.exists():
        return "no epoch had finished, nothing was kept"
    return f"{out} holds epoch {last_meta(file)['epoch']}, the last good one; {then}"


def check_space(out, trainable):
    """Stop before training where the checkpoint files would not fit on the disk."""
    # float32: the weights (4 bytes a value) and last.safetensors (with AdamW's two moments, 12),
    # twice while replaced
    need = 28 * trainable + 2**20
    free = shutil.disk_usage(out).free
    if need > free:
        raise UserError(
            f"{out}: the checkpoint files need about {need / 2**20:.1f} MiB, {free / 2**20:.1f} free"
        )


def save_last(file, readout, optimizer, loader, epoch, step):
    """What continuing after `epoch` needs: trained tensors, optimizer state, random states; the rest as
    metadata."""
    tensors = {f"model.{k}": v for k, v in trained_state(readout).items()}
    state = optimizer.state_dict()
    tensors.update({f"optim.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.loader"] = loader.generator.get_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = dict(epoch=epoch, step=step, param_groups=state["param_groups"])
    save_tensors(file, tensors, {"train": json.dumps(meta)})


def last_meta(file):
    """What save_last wrote as metadata: the epoch, the step, the optimizer's parameter groups."""
    with safe_open(file, framework="pt") as f:
        return json.loads(f.metadata()["train"])


def load_last(file, readout, optimizer, loader):
    """Restore what save_last wrote -> (epoch, step)."""
    tensors = read_tensors(file)  # a clear error for a missing, truncated or foreign file
    meta = last_meta(file)
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


def parser(
    out_help="the checkpoint folder (default: runs/DATA-READOUT-MODALITIES-sSEED)", resume=True
):
    """train.py's flags (ablate.py's too, less --resume and --overwrite)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help, allow_abbrev=False)
    run_flags(p)
    machine = p.add_argument_group(
        "this machine (not saved with the run; --resume takes them from here)"
    )
    machine_flags(machine)
    machine.add_argument(
        "--grad_ckpt",
        action="store_true",
        help="activation checkpointing of the layers that train: less memory, slower",
    )
    p.add_argument("--out", help=out_help)
    p.add_argument(
        "--recipe",
        choices=list(RECIPES),
        help="the paper's settings as reported (README): mlp head, l1, LoRA r 32 on its targets, lr 2e-4",
    )
    if resume:
        p.add_argument(
            "--resume",
            metavar="DIR",
            help="continue the run in DIR after its last finished epoch, with its own run settings",
        )
        p.add_argument("--overwrite", action="store_true", help="replace the run that --out holds")
    return p


def read_flags(p, argv):
    """The settings a command line gives, --recipe's as the defaults (a flag given still wins)."""
    quickhelp.save(p)
    recipe = p.parse_args(argv).recipe
    if recipe:
        p.set_defaults(**RECIPES[recipe])
    cfg = resolve(vars(p.parse_args(argv)))
    del cfg["recipe"]
    return cfg


def parse_args(argv=None):
    """The command line -> the run's settings; with --resume, those of the run in its folder, which a run
    flag given here may not contradict."""
    p = parser()
    cfg = read_flags(p, argv)
    if cfg["resume"]:
        given = given_flags(p, argv)
        saved = load_config(cfg["resume"])
        changed = [
            f"--{k} {given[k]} (the run's: {saved[k]})"
            for k in given.keys() & saved.keys()
            if given[k] != saved[k]
        ]
        if changed:
            raise UserError(
                f"--resume {cfg['resume']} continues the run with its own settings, not {'; '.join(changed)}: "
                "train a new run (another --out, or --overwrite) for other settings"
            )
        cfg = {**cfg, **saved, "out": cfg["resume"]}
    data = Path(cfg["data"].replace(":", "")).name
    cfg["out"] = cfg["out"] or f"runs/{data}-{cfg['readout']}-{cfg['modalities']}-s{cfg['seed']}"
    check_values(cfg)
    return cfg


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
