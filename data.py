"""Data: MMSA-layout datasets, PyAV decoding with an on-disk cache, the toy dataset, prompts and batches.

An MMSA-layout folder holds `label.csv` (video_id, clip_id, text, label, mode) and the clips under
`Raw/<video_id>/<clip_id>.mp4`; a `.wav` beside an mp4 is used for its audio when present.
"""
import csv
import hashlib
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from tqdm import tqdm

SAMPLE_RATE = 16000
SPLITS = ("train", "valid", "test")
REQUIRED_COLUMNS = ("video_id", "clip_id", "text", "label", "mode")


class DataError(ValueError):
    """A bad input; the message names the file (and the label.csv line). The scripts print it without a
    traceback. `kind` groups the skip counts of --on_bad skip."""

    def __init__(self, message, kind="bad input"):
        super().__init__(message)
        self.kind = kind


class CheckpointError(ValueError):
    """A missing, corrupt or foreign checkpoint file; the message names it. Defined here, not in eval.py, so that
    the script run as __main__ and the modules importing it share one class."""


SYSTEM = "You are an expert in multimodal sentiment analysis."
QUESTION = ("How positive or negative is the speaker's opinion in this clip? Answer with a sentiment "
            "score from -3 (very negative) to 3 (very positive).")


def data_root(name):
    """`toy`, `mosi`, `mosei` (under $MSA_DATA, default ./data) or a path to an MMSA-layout folder."""
    base = Path(os.environ.get("MSA_DATA", "data"))
    if name == "toy" or name.startswith("toy:"):  # toy:N asks for N clips
        n = int(name.partition(":")[2] or TOY_CLIPS)
        return make_toy(base / f"toy{n}", n)
    if name in ("mosi", "mosei"):
        return base / name.upper()
    return Path(name)


def read_split(root, split, on_bad="error"):
    """The rows of `label.csv` whose `mode` is `split`, as dicts with string ids, a float label and the
    line -> (rows, skipped). A bad row is an error, or with on_bad='skip' a (clip id, DataError) in skipped."""
    path = Path(root) / "label.csv"
    if not path.is_file():
        raise DataError(f"{path}: not found (an MMSA-layout folder needs label.csv and "
                                "Raw/<video_id>/<clip_id>.mp4)")
    rows, skipped, seen = [], [], {}
    # surrogateescape: a byte that is not UTF-8 becomes a lone surrogate, so that its row can be named
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
        for r in reader:
            clip = f"{r['video_id']}/{r['clip_id']}"
            problem = _row_problem(r, seen.get(clip))
            seen.setdefault(clip, reader.line_num)
            if r["mode"] not in (split, None):  # None: a short row, of no known split
                continue
            if problem is None:
                rows.append(dict(video_id=r["video_id"], clip_id=r["clip_id"], text=r["text"],
                                 label=float(r["label"]), line=reader.line_num))
                continue
            error = DataError(f"{path}, line {reader.line_num} (clip {clip}): {problem[1]}", problem[0])
            if on_bad != "skip":
                raise DataError(f"{error} (--on_bad skip skips such clips)", error.kind)
            skipped.append((clip, error))
    if not rows and not skipped:
        raise DataError(f"{path}: no clips with mode == {split!r}")
    return rows, skipped


def _row_problem(r, first_line):
    """(kind, message) of what is wrong with a label.csv row, or None."""
    if None in r:
        return "bad row", "more fields than the header"
    if None in r.values():
        return "bad row", "fewer fields than the header"
    if first_line is not None:
        return "duplicate id", f"the clip id is also on line {first_line}"
    if any("\udc80" <= ch <= "\udcff" for ch in r["text"]):
        return "bad transcript", "the transcript is not valid UTF-8"
    if not r["label"].strip():
        return "bad label", "the label is empty"
    try:
        label = float(r["label"])
    except ValueError:
        return "bad label", f"the label {r['label']!r} is not a number"
    if not math.isfinite(label):
        return "bad label", f"the label {r['label']!r} is not finite"
    if abs(label) > 3:
        return "bad label", f"the label {label} is outside [-3, 3], the range the metrics assume"
    return None


# ---------------------------------------------------------------------------------------------- decoding

def decode_video(path, fps, max_frames, max_pixels):
    """Frames sampled at `fps` (at least 2, at most `max_frames`, spread evenly over the clip), each
    resized to fit `max_pixels`. Returns uint8 (T, H, W, 3)."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise DataError(f"{path}: no video stream", "bad media")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if stream.duration is not None:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = (container.duration or 0) / av.time_base
        n = min(max(round(duration * fps), 2), max_frames)
        targets = [(i + 0.5) * duration / n for i in range(n)]
        scale = min(1.0, math.sqrt(max_pixels / (stream.width * stream.height)))
        size = dict(width=max(2, int(stream.width * scale)), height=max(2, int(stream.height * scale)))
        frames, last = [], None
        for frame in _frames(container, stream):  # the first frame at or after each target time
            last = frame
            while len(frames) < n and (frame.time or 0.0) >= targets[len(frames)]:
                frames.append(frame.reformat(format="rgb24", **size).to_ndarray())
            if len(frames) == n:
                break
        if last is None:
            raise DataError(f"{path}: no decodable video frames", "bad media")
        while len(frames) < n:  # targets past the last frame's time
            frames.append(last.reformat(format="rgb24", **size).to_ndarray())
    return np.stack(frames)


def decode_audio(path):
    """The first audio stream of an mp4 or wav as float32 mono at 16 kHz."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise DataError(f"{path}: no audio stream", "bad media")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        chunks = [r.to_ndarray().reshape(-1) for f in _frames(container, container.streams.audio[0])
                  for r in resampler.resample(f)]
        chunks += [r.to_ndarray().reshape(-1) for r in resampler.resample(None)]
    if not chunks:
        raise DataError(f"{path}: no decodable audio", "bad media")
    return np.concatenate(chunks).astype(np.float32)


def _frames(container, stream):
    """The decoded frames of a stream; packets the decoder rejects (a damaged stretch of a file) are passed over."""
    for packet in container.demux(stream):
        try:
            yield from packet.decode()
        except av.error.InvalidDataError:
            continue


def file_id(path):
    """What identifies a media file's contents for the caches: its full path, size and modification time."""
    stat = os.stat(path)
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns


def cache_file(folder, parts, suffix):
    return Path(folder) / f"{hashlib.sha1(repr(parts).encode()).hexdigest()}{suffix}"


def store(file, write):
    """write(path) to a temporary name, renamed to `file`: atomic, for DataLoader workers and torchrun processes
    may race on a key."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f"{file.stem}.{os.getpid()}.tmp{file.suffix}")
    write(tmp)
    os.replace(tmp, file)


def cached(decode, path, cache_dir, load=True, **settings):
    """`decode(path, **settings)`, stored under `cache_dir`; a changed file (size, mtime) is decoded anew.
    load=False only makes sure the cache holds it (None when it did already)."""
    file = cache_file(cache_dir, (decode.__name__, *file_id(path), sorted(settings.items())), ".npy")
    if file.exists():
        return np.load(file) if load else None
    array = decode(path, **settings)
    store(file, lambda tmp: np.save(tmp, array))
    return array


class Clips(torch.utils.data.Dataset):
    """One split of an MMSA-layout folder; items hold the text, the label and the decoded media that
    `modalities` (a subset of 'tav') asks for. Every clip's media are decoded (into the cache) up front, by
    `workers` threads, so that a bad file stops the run before training, or with on_bad='skip' is skipped
    and counted."""

    def __init__(self, root, split, modalities="tav", fps=2.0, max_frames=32, max_pixels=128 * 28 * 28,
                 cache_dir="cache", on_bad="error", workers=0):
        if not modalities or set(modalities) - set("tav"):
            raise ValueError(f"--modalities must be a non-empty subset of 'tav', not {modalities!r}")
        self.root, self.modalities, self.cache_dir = Path(root), modalities, cache_dir
        self.video_settings = dict(fps=fps, max_frames=max_frames, max_pixels=max_pixels)
        rows, self.skipped = read_split(root, split, on_bad)  # skipped: (clip id, DataError)

        def check(r):  # decode into the cache, or find it there, without reading it back -> None or the problem
            mp4 = self.root / "Raw" / r["video_id"] / f"{r['clip_id']}.mp4"
            wav = mp4.with_suffix(".wav")
            r["video"], r["audio"] = mp4, (wav if wav.exists() else mp4)
            try:
                self.media(r, load=False)
            except DataError as e:
                return DataError(f"{e} (clip {r['video_id']}/{r['clip_id']}, {self.root / 'label.csv'} line "
                                 f"{r['line']})", e.kind)

        with ThreadPoolExecutor(max(1, workers)) as pool:  # PyAV decodes without holding the GIL
            problems = list(tqdm(pool.map(check, rows), total=len(rows), desc=f"decoding {split}", leave=False,
                                 disable=modalities == "t" or len(rows) < 50))
        self.rows = []
        for r, e in zip(rows, problems):
            if e is None:
                self.rows.append(r)
            elif on_bad != "skip":
                raise DataError(f"{e}; --on_bad skip skips such clips", e.kind) from None
            else:
                self.skipped.append((f"{r['video_id']}/{r['clip_id']}", e))
        if not self.rows:
            raise DataError(f"{self.root}: no usable clip in {split!r} for --modalities {modalities} "
                            f"({len(self.skipped)} skipped)")
        self.empty_transcripts = sum(not r["text"].strip() for r in self.rows)

    def skip_counts(self):
        return dict(Counter(e.kind for _, e in self.skipped))

    def media(self, r, load=True):
        """The decoded media of a row (through the cache); a missing or undecodable file is a DataError."""
        item = {}
        for m, name, decode, settings in (("v", "video", decode_video, self.video_settings),
                                          ("a", "audio", decode_audio, {})):
            if m not in self.modalities:
                continue
            if not r[name].exists():
                raise DataError(f"{r[name]}: not found, needed for --modalities {self.modalities}", "missing file")
            try:
                item[name] = cached(decode, r[name], self.cache_dir, load, **settings)
            except av.error.FFmpegError as e:
                raise DataError(f"{r[name]}: cannot be decoded ({e})", "bad media") from None
        return item

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        r = self.rows[i]
        return dict(id=f"{r['video_id']}/{r['clip_id']}", text=r["text"], label=r["label"], **self.media(r))


# ---------------------------------------------------------------------------------- prompts and batches

def build_prompt(text, modalities):
    """The Qwen chat prompt; what `modalities` leaves out is absent, not blanked."""
    media = ("<|vision_bos|><|VIDEO|><|vision_eos|>" if "v" in modalities else "") + \
            ("<|audio_bos|><|AUDIO|><|audio_eos|>" if "a" in modalities else "")
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
            f"<|im_start|>user\n{media}{user_text(text, modalities)}<|im_end|>\n<|im_start|>assistant\n")


def user_text(text, modalities="t"):
    transcript = f'Transcript: "{text}"\n' if "t" in modalities else ""
    return f"{transcript}{QUESTION}"


def text_input(text, tokenizer):
    """A text-only backbone's input: its chat template around the same question, or without a chat template
    (an encoder) the transcript alone."""
    if tokenizer.chat_template is None:
        return text
    messages = [dict(role="system", content=SYSTEM), dict(role="user", content=user_text(text))]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class Collate:
    """Clips -> one processor batch: {'inputs': model kwargs, 'label': (B,), 'ids': [str]}."""

    def __init__(self, processor, modalities, fps=2.0, max_pixels=128 * 28 * 28):
        self.processor, self.modalities = processor, modalities
        self.tokenizer = getattr(processor, "tokenizer", processor)  # the Omni processor's, or a text backbone's
        self.omni = self.tokenizer is not processor
        self.video_kwargs = dict(fps=fps, size={"shortest_edge": 4 * 28 * 28, "longest_edge": max_pixels})

    def __call__(self, items):
        prompts = [self.prompt(it["text"]) for it in items]
        if self.omni:
            inputs = self.processor(text=prompts, padding=True, return_tensors="pt", **self.media(items))
        else:
            inputs = self.tokenizer(prompts, padding=True, return_tensors="pt",
                                    add_special_tokens=self.tokenizer.chat_template is None)
        return self.batch(dict(inputs), items)

    def prompt(self, text):
        return build_prompt(text, self.modalities) if self.omni else text_input(text, self.tokenizer)

    def merge(self, items):
        """A batch of Processed items, as __call__ makes it of the same clips: token rows padded on the tokenizer's
        side, audio features at the end (masked: the audio tower never reads them), the rest concatenated."""
        inputs = {}
        for key in items[0]["inputs"]:
            rows = [it["inputs"][key] for it in items]
            if key in ("input_ids", "attention_mask", "token_type_ids", "input_features", "feature_attention_mask"):
                n, left = max(x.shape[-1] for x in rows), self.tokenizer.padding_side == "left" and "feature" not in key
                fill = self.tokenizer.pad_token_id if key == "input_ids" else 0
                rows = [F.pad(x, (n - x.shape[-1], 0) if left else (0, n - x.shape[-1]), value=fill) for x in rows]
            inputs[key] = torch.cat(rows)
        return self.batch(inputs, items)

    @staticmethod
    def batch(inputs, items):
        return dict(inputs=inputs, label=torch.tensor([it["label"] for it in items], dtype=torch.float32),
                    ids=[it["id"] for it in items])

    def media(self, items):
        media = {}
        if "a" in self.modalities:
            media["audio"] = [it["audio"] for it in items]
            # The processor pads Whisper features to 30 s; padding to the longest clip plus n_fft zeros
            # gives the same features on every real frame, at a fraction of the cost.
            longest = max(len(a) for a in media["audio"])
            media["audio_kwargs"] = {"max_length": min(longest + 480, 30 * SAMPLE_RATE)}
        if "v" in self.modalities:
            media["videos"] = [it["video"] for it in items]
            media["videos_kwargs"] = self.video_kwargs
        return media


class Processed(torch.utils.data.Dataset):
    """`clips` run through `collate` (the processor) one clip at a time, each clip's model inputs stored under
    <cache_dir>/processed: later epochs and runs read them back instead of the decoded media, skipping the
    processor too. Batch them with `collate.merge`. Opt-in (--cache_processed): float32 video patches take about
    four times the disk of the decoded uint8 frames."""

    def __init__(self, clips, collate, cache_dir):
        self.clips, self.collate, self.folder = clips, collate, Path(cache_dir) / "processed"
        self.settings = (clips.modalities, clips.video_settings, repr(collate.video_kwargs),
                         hashlib.sha1(repr(collate.processor).encode()).hexdigest())

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        r = self.clips.rows[i]
        media = [file_id(r[name]) for m, name in (("v", "video"), ("a", "audio")) if m in self.clips.modalities]
        file = cache_file(self.folder, (self.settings, self.collate.prompt(r["text"]), media), ".safetensors")
        if file.exists():
            inputs = safetensors.torch.load_file(file)
        else:
            inputs = {k: v.contiguous() for k, v in self.collate([self.clips[i]])["inputs"].items()}
            store(file, lambda tmp: safetensors.torch.save_file(inputs, tmp))
        return dict(inputs=inputs, label=r["label"], id=f"{r['video_id']}/{r['clip_id']}")


def load_clips(cfg, split):
    """The Clips of one split of the run `cfg` describes, with what was skipped or is odd printed."""
    clips = Clips(data_root(cfg["data"]), split, cfg["modalities"], cfg["fps"], cfg["max_frames"],
                  cfg["max_pixels"], cfg["cache_dir"], cfg["on_bad"], cfg["num_workers"])
    if clips.skipped:
        counts = ", ".join(f"{k} {n}" for k, n in clips.skip_counts().items())
        print(f"data: skipped {len(clips.skipped)} of {len(clips.skipped) + len(clips)} clips of {split!r} "
              f"(--on_bad skip): {counts}; e.g. {clips.skipped[0][1]}")
    if clips.empty_transcripts:
        print(f"data: {clips.empty_transcripts} clip(s) of {split!r} with an empty transcript (kept)")
    return clips


def make_loader(cfg, split, processor, batch_size=None, shuffle=False, seed=0, drop_last=False, clips=None,
                rank=0, world=1):
    """A DataLoader over one split of the run `cfg` describes (eval_batch_size unless told otherwise), over
    `clips` when they are loaded already. With world > 1, this rank's share: shuffled, its part of each global
    batch (ShardedShuffle, which drops incomplete ones); not shuffled, every world-th clip from the rank-th."""
    clips = clips if clips is not None else load_clips(cfg, split)
    collate = Collate(processor, cfg["modalities"], cfg["fps"], cfg["max_pixels"])
    if cfg.get("cache_processed"):
        clips, collate = Processed(clips, collate, cfg["cache_dir"]), collate.merge
    batch_size, sampler, generator = batch_size or cfg["eval_batch_size"], None, torch.Generator().manual_seed(seed)
    if world > 1:
        sampler = ShardedShuffle(len(clips), batch_size, rank, world, generator) if shuffle else \
            range(rank, len(clips), world)
        shuffle = False
    return torch.utils.data.DataLoader(
        clips, batch_size=batch_size, shuffle=shuffle, sampler=sampler, generator=generator,
        num_workers=cfg["num_workers"], drop_last=drop_last, collate_fn=collate)


class ShardedShuffle(torch.utils.data.Sampler):
    """For one of `world` processes (torchrun): the order that DataLoader(shuffle=True, generator=g) gives a
    single process, cut into global batches of batch_size * world clips, of which this rank takes its own
    contiguous batch_size. Together the processes see exactly the batches one process would see with the global
    batch size; incomplete global batches are dropped. The loader must get the same generator."""

    def __init__(self, n, batch_size, rank, world, generator):
        self.n, self.batch_size, self.rank, self.world, self.generator = n, batch_size, rank, world, generator

    def __iter__(self):
        perm = torch.randperm(self.n, generator=self.generator).tolist()
        torch.randperm(self.n, generator=self.generator)  # RandomSampler draws a second one per epoch: so do we
        size = self.batch_size * self.world
        for start in range(0, self.n - size + 1, size):
            yield from perm[start + self.rank * self.batch_size:start + (self.rank + 1) * self.batch_size]

    def __len__(self):
        return self.n // (self.batch_size * self.world) * self.batch_size


def to_device(batch, device):
    return {**batch, "inputs": {k: v.to(device) for k, v in batch["inputs"].items()},
            "label": batch["label"].to(device)}


# ----------------------------------------------------------------------------------------- toy dataset

TOY_CLIPS = 300
TOY_PARTS = {"t": 1.5, "a": 0.75, "v": 0.75}  # the label is the sum of one part per modality, each uniform in ±this
TOY_WORDS = {-3: ["horrible", "awful", "dreadful"], -2: ["bad", "poor", "boring"], -1: ["dull", "weak", "bland"],
             0: ["okay", "average", "so so"], 1: ["decent", "pleasant", "fine"], 2: ["good", "great", "lovely"],
             3: ["amazing", "brilliant", "wonderful"]}
TOY_SUBJECTS = ["the movie", "the plot", "the acting", "the soundtrack", "the ending", "the cast"]
TOY_OPENERS = ["", "honestly ", "i think ", "to be fair ", "well "]


def make_toy(root, n=TOY_CLIPS, seed=0):
    """Write (once) an MMSA-layout dataset of `n` real mp4 clips (H.264 + AAC). The label is the sum of three
    independent parts, carried by the transcript's words, the audio's pitch and the video's brightness; text
    carries the largest part (as on MOSI), and only all three modalities together determine the label."""
    root = Path(root)
    if (root / "label.csv").exists():
        return root
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        video_id, clip_id = f"toy{i // 6:03d}", str(i % 6 + 1)
        part = {m: float(rng.uniform(-half, half)) for m, half in TOY_PARTS.items()}
        label = round(sum(part.values()), 1)
        word = rng.choice(TOY_WORDS[round(part["t"] * 3 / TOY_PARTS["t"])])  # 7 word levels over ±1.5
        text = f"{rng.choice(TOY_OPENERS)}{rng.choice(TOY_SUBJECTS)} was {word}"
        path = root / "Raw" / video_id / f"{clip_id}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_clip(path, seconds=float(rng.uniform(1.5, 3.0)), pitch_hz=220 * 2 ** (part["a"] / TOY_PARTS["a"]),
                    brightness=128 + 108 * part["v"] / TOY_PARTS["v"], rng=rng)
        mode = SPLITS[[0, 0, 0, 1, 2][(i // 6) % 5]]  # split by video, as MOSI's folds are
        rows.append([video_id, clip_id, text, label, mode])
    tmp = root / "label.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([list(REQUIRED_COLUMNS)] + rows)
    os.replace(tmp, root / "label.csv")  # label.csv last: its presence marks a complete dataset
    return root


def _write_clip(path, seconds, pitch_hz, brightness, rng, fps=10, size=64, rate=44100):
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=rate, layout="mono")
        for _ in range(round(seconds * fps)):
            image = np.clip(brightness + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(video.encode())
        t = np.arange(round(seconds * rate)) / rate
        wave = (0.3 * np.sin(2 * np.pi * pitch_hz * t) + 0.02 * rng.normal(size=t.size)).astype(np.float32)
        for start in range(0, wave.size, 1024):  # AAC takes frames of 1024 samples
            frame = av.AudioFrame.from_ndarray(wave[None, start:start + 1024], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            container.mux(audio.encode(frame))
        container.mux(audio.encode())
