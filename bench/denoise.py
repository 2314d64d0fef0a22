"""Audio denoising (--denoise): SI-SDR of --data's clips mixed with white noise and with another clip's speech
(babble) at 0 and 5 dB SNR, seconds per second of audio, and a spectrogram picture.

    python -m bench.denoise --model tiny --data ../shared/data/mosi_clips --denoising runs/denoising
"""

import time
from pathlib import Path

import numpy as np

from bench.common import command, report, run
from data import SAMPLE_RATE, Clips, check_denoise, deepfilternet


def si_sdr(estimate, reference):
    """Scale-invariant signal-to-distortion ratio in dB (Le Roux et al., 2019): the estimate's part along the
    reference against the rest."""
    target = reference * np.dot(estimate, reference) / np.dot(reference, reference)
    return float(10 * np.log10(np.sum(target**2) / np.sum((estimate - target) ** 2)))


def mixed(clean, noise, snr_db):
    """`clean` plus `noise` (cut or repeated to its length) scaled to `snr_db` below it."""
    noise = np.resize(noise, clean.shape)
    scale = np.sqrt(np.mean(clean**2) / np.mean(noise**2) / 10 ** (snr_db / 10))
    return (clean + scale * noise).astype(np.float32)


def denoising(cfg, out):
    """DeepFilterNet (--denoise deepfilternet) on each audio clip of --data's train split (16 kHz, mono) with white noise and with the next
    clip's speech (babble) at 0 and 5 dB SNR: SI-SDR of the noisy and the denoised audio against the clean
    clip, and seconds of denoising per second of audio. out/denoising.png: one clip's spectrograms."""
    import matplotlib.pyplot as plt

    check_denoise("deepfilternet")
    clips = Clips(cfg.but(modalities="a", on_bad="skip"), "train")
    waves = {r["id"]: clips.media(r)["audio"] for r in clips.rows}
    rng, result, seconds, spent, shown = np.random.default_rng(cfg.seed), {}, 0.0, 0.0, {}
    for i, (clip, clean) in enumerate(waves.items()):
        babble = list(waves.values())[(i + 1) % len(waves)]
        for kind, noise in (("white", rng.normal(size=clean.shape)), ("babble", babble)):
            for snr in (0, 5):
                noisy = mixed(clean, noise, snr)
                start = time.perf_counter()
                denoised = deepfilternet(noisy)
                spent += time.perf_counter() - start
                seconds += len(noisy) / SAMPLE_RATE
                key = f"{clip} {kind} {snr} dB"
                result[key] = dict(noisy=si_sdr(noisy, clean), denoised=si_sdr(denoised, clean))
                shown.setdefault(kind, (clean, noisy, denoised))
    result["seconds_per_second"] = spent / seconds
    out.mkdir(parents=True, exist_ok=True)
    clean, noisy, denoised = shown["white"]
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(7, 6))
    for ax, wave, title in zip(
        axes, (clean, noisy, denoised), ("clean", "white noise, 0 dB SNR", "denoised")
    ):
        ax.specgram(wave, Fs=SAMPLE_RATE, NFFT=512, noverlap=384, cmap="magma", vmin=-140)
        ax.set(ylabel="Hz", title=f"{next(iter(waves))}: {title}")
    axes[-1].set(xlabel="s")
    fig.savefig(out / "denoising.png", dpi=110, bbox_inches="tight")
    print(f"written: {out / 'denoising.png'}")
    return result


def main(argv=None):
    cmd = command(__doc__)
    cmd.parser.add_argument(
        "--denoising", metavar="DIR", required=True, help="the folder of the spectrogram picture"
    )
    cfg = cmd.settings(cmd.parse(argv))
    report(denoising(cfg, Path(cfg.denoising)), cfg.json)


if __name__ == "__main__":
    run(main)
