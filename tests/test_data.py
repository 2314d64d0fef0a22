import csv
import os
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

import data


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
        assert c.streams.video[0].codec_context.name == "h264" and c.streams.audio[0].codec_context.name == "aac"
    again = data.make_toy(tmp_path / "again", n=60)
    assert (again / "label.csv").read_text() == (toy_root / "label.csv").read_text()


def test_each_toy_modality_carries_the_label(toy_root):
    """Brightness and pitch track the label (the transcript's words are checked by training)."""
    rows = data.read_split(toy_root, "train")
    labels, brightness, pitch = [], [], []
    for r in rows:
        mp4 = toy_root / "Raw" / r["video_id"] / f"{r['clip_id']}.mp4"
        labels.append(r["label"])
        brightness.append(data.decode_video(mp4, fps=2, max_frames=4, max_pixels=4096).mean())
        audio = data.decode_audio(mp4)
        pitch.append(np.argmax(np.abs(np.fft.rfft(audio))) * data.SAMPLE_RATE / audio.size)
    assert np.corrcoef(labels, brightness)[0, 1] > 0.6
    assert np.corrcoef(labels, np.log(pitch))[0, 1] > 0.6


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
    full = data.build_prompt("it was fine", "tav")
    assert "<|VIDEO|>" in full and "<|AUDIO|>" in full and "it was fine" in full
    audio_only = data.build_prompt("it was fine", "a")
    assert "<|AUDIO|>" in audio_only and "<|VIDEO|>" not in audio_only and "it was fine" not in audio_only
    assert audio_only.startswith("<|im_start|>system\n") and audio_only.endswith("<|im_start|>assistant\n")


def test_bad_inputs_name_the_file(tmp_path, toy_root):
    with pytest.raises(data.DataError, match="label.csv"):
        data.read_split(tmp_path, "train")
    (tmp_path / "label.csv").write_text("video_id,clip_id,text,label\nv,1,hi,0.5\n")
    with pytest.raises(data.DataError, match="missing column.*mode"):
        data.read_split(tmp_path, "train")
    (tmp_path / "label.csv").write_text("video_id,clip_id,text,label,mode\nv,1,hi,0.5,train\n")
    with pytest.raises(data.DataError, match=r"Raw/v/1\.mp4"):
        data.Clips(tmp_path, "train", "tav")
    assert len(data.Clips(tmp_path, "train", "t")) == 1  # text alone needs no media files
    with pytest.raises(ValueError, match="--modalities"):
        data.Clips(toy_root, "train", "tx")


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
real = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data (real MOSI files) is absent")


@real
def test_real_mosi_mp4_decodes_at_the_requested_fps_and_16k_mono():
    mp4 = SHARED / "mosi_clips" / "Raw" / "Oz06ZWiO20M" / "6.mp4"  # H.264 480x360 30 fps, 44.1 kHz AAC
    with av.open(str(mp4)) as c:
        video_seconds = float(c.streams.video[0].duration * c.streams.video[0].time_base)
        audio_seconds = float(c.streams.audio[0].duration * c.streams.audio[0].time_base)
    frames = data.decode_video(mp4, fps=2.0, max_frames=32, max_pixels=128 * 28 * 28)
    assert frames.shape[0] == round(video_seconds * 2.0) == 15
    h, w = frames.shape[1:3]
    assert h * w <= 128 * 28 * 28 and abs(w / h - 480 / 360) < 0.02
    assert data.decode_video(mp4, fps=10.0, max_frames=8, max_pixels=10**6).shape == (8, 360, 480, 3)
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
        data.Clips(root, "train", "tav", cache_dir=tmp_path)
    clips = data.Clips(root, "train", "tav", cache_dir=tmp_path, on_missing="skip")
    assert len(clips) == 1 and clips.skipped == [("03bSnISJMiM/1", f"missing {root}/Raw/03bSnISJMiM/1.mp4")]
    audio_only = data.Clips(root, "train", "ta", cache_dir=tmp_path)  # the wav serves the audio
    assert len(audio_only) == 2 and {it["id"] for it in audio_only} == {"03bSnISJMiM/1", "Oz06ZWiO20M/6"}
    assert all(it["audio"].size > data.SAMPLE_RATE for it in audio_only)


@real
def test_real_mosi_transcripts_need_no_raw_folder():
    root = SHARED / "mosi_text"
    assert not (root / "Raw").exists()
    sizes = {split: len(data.Clips(root, split, "t")) for split in data.SPLITS}
    assert sizes == {"train": 1284, "valid": 229, "test": 686}
    train = data.Clips(root, "train", "t")
    assert sum(not train[i]["text"] for i in range(len(train))) == 3  # empty transcripts are kept
    assert all(isinstance(train[i]["id"], str) for i in range(3))


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
    assert np.array_equal(data.cached(decode_video, mp4, tmp_path / "cache", **settings), first) and len(calls) == 1
    data.cached(decode_video, mp4, tmp_path / "cache", **{**settings, "fps": 1.0})  # another setting
    assert len(calls) == 2
    with open(mp4, "ab") as f:  # the file changed (size)
        f.write(b"\0")
    data.cached(decode_video, mp4, tmp_path / "cache", **settings)
    assert len(calls) == 3
