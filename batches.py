"""Batches for a backbone: a clip's prompt (the Thinker's with its media placeholders, or a text model's chat
template), the processor's inputs for it (cached on disk with --cache_processed), batches padded on the
tokenizer's side, and the sampler that shuffles (and groups by length) for one process or for torchrun."""

import functools
import hashlib
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F

from data import cache_file, read_cached
from util import write_atomically

SYSTEM = "You are an expert in multimodal sentiment analysis."
QUESTION = (
    "How positive or negative is the speaker's opinion in this clip? Answer with a sentiment "
    "score from -3 (very negative) to 3 (very positive)."
)


class ModelInputs(torch.utils.data.Dataset):
    """Clips as the processor's output, a batch of one each; with cache_processed, kept on disk, so that later
    epochs neither read the decoded media nor run the processor. `parts`: a backbone's tokenizer and
    processor (None for a text model); `cfg`: the run's settings (its question, system prompt, cache_processed)."""

    def __init__(self, clips, parts, cfg):
        self.clips, self.parts, self.cfg = clips, parts, cfg
        self.processed_key = None
        if cfg.cache_processed:
            made_by = repr(parts.processor or parts.tokenizer)
            self.processed_key = hashlib.sha1(made_by.encode()).hexdigest()

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        c, r = self.clips, self.clips.rows[i]
        cfg = self.cfg
        text = prompt(
            r["text"], c.modalities, self.parts, c.audio_in_video, cfg.question, cfg.system
        )
        file = None
        if self.processed_key:
            folder = Path(c.cache_dir) / "processed"
            media = [r["mp4"].with_suffix(s) for s in (".mp4", ".wav")]
            files = [m for m in media if m.exists()]  # those its media come from
            key = [text, *files, c.video, c.audio, self.processed_key]
            file = cache_file(folder, *key, suffix=".safetensors")
        inputs = read_cached(file, safetensors.torch.load)
        if inputs is None:
            media = c.media(r)
            fps, max_pixels = c.video["fps"], c.video["max_pixels"]
            inputs = model_inputs(self.parts, text, media, fps, max_pixels, c.audio_in_video)
        if file and not file.exists():
            contiguous = {k: v.contiguous() for k, v in inputs.items()}
            write_atomically(file, safetensors.torch.save(contiguous))
        return dict(inputs=inputs, label=r["label"])


def model_inputs(parts, text, media, fps=2.0, max_pixels=128 * 28 * 28, audio_in_video=False):
    """The processor's output (a batch of 1) for a clip's prompt and decoded media: {'videos': ..., 'audio': ...}."""
    processor = parts.processor
    if processor is None:  # a text model: its tokenizer
        encoder = parts.tokenizer.chat_template is None  # it gets [CLS] and [SEP]
        return dict(parts.tokenizer([text], return_tensors="pt", add_special_tokens=encoder))
    kwargs = {k: [v] for k, v in media.items()}
    if audio_in_video:  # Qwen's own layout: the audio in the video's placeholder, in 2-s chunks
        kwargs.update(load_audio_from_video=True, audio_from_video_indices=[0])
    if "audio" in media:  # Whisper features of the whole clip (by default cut or padded to 30 s)
        kwargs["audio_kwargs"] = dict(max_length=len(media["audio"]) + 480)
    if "videos" in media:
        kwargs["videos_kwargs"] = dict(
            fps=fps, size={"shortest_edge": 4 * 28 * 28, "longest_edge": max_pixels}
        )
    return dict(processor(text=[text], return_tensors="pt", **kwargs))


def prompt(text, modalities, parts, audio_in_video=False, question=QUESTION, system=SYSTEM):
    """The Qwen chat prompt with the media `modalities` asks for (the others absent, not blanked); for a text model,
    the same question through its chat template (an encoder, which has none, reads the transcript alone)."""
    question = (f'Transcript: "{text}"\n' if "t" in modalities else "") + question
    if parts.processor is not None:
        media = ""
        if "v" in modalities:
            media += "<|vision_bos|><|VIDEO|><|vision_eos|>"
        if "a" in modalities and not audio_in_video:
            media += "<|audio_bos|><|AUDIO|><|audio_eos|>"
        return (
            f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\n{media}{question}<|im_end|>\n<|im_start|>assistant\n"
        )
    if parts.tokenizer.chat_template is None:
        return text
    return parts.tokenizer.apply_chat_template(
        [dict(role="system", content=system), dict(role="user", content=question)],
        tokenize=False,
        add_generation_prompt=True,
    )


def collate(items, tokenizer):
    """Clips' inputs -> the batch the processor makes: each key's tensors padded to one length in their last
    dimension (tokens on the tokenizer's side; audio features at the end, masked: the audio tower never reads
    them; the media's patches are alike in it) and concatenated."""
    inputs = {}
    for key in items[0]["inputs"]:
        rows = [it["inputs"][key] for it in items]
        n = max(x.shape[-1] for x in rows)
        left = tokenizer.padding_side == "left" and "feature" not in key
        fill = tokenizer.pad_token_id if key == "input_ids" else 0
        rows = [
            F.pad(x, (n - x.shape[-1], 0) if left else (0, n - x.shape[-1]), value=fill)
            for x in rows
        ]
        inputs[key] = torch.cat(rows)
    return dict(inputs=inputs, label=torch.tensor([it["label"] for it in items]))


def make_loader(cfg, clips, parts, batch_size=None, shuffle=False, seed=0, rank=0, world=1):
    """A DataLoader over `clips` (eval_batch_size unless told otherwise). Shuffled: this rank's part of
    each complete global batch (ShardedShuffle); not shuffled, every clip on every rank."""
    batch_size = batch_size or cfg.eval_batch_size
    generator = torch.Generator().manual_seed(seed)
    tokenizer = parts.tokenizer
    sampler = None
    if shuffle:
        # a transcript's tokens stand for its prompt's length
        transcripts = tokenizer([r["text"] for r in clips.rows], return_length=True)
        lengths = torch.tensor(transcripts["length"])
        sampler = ShardedShuffle(lengths, batch_size, rank, world, generator, cfg.group_by_length)
    return torch.utils.data.DataLoader(
        ModelInputs(clips, parts, cfg),
        batch_size=batch_size,
        sampler=sampler,
        generator=generator,
        num_workers=cfg.num_workers,
        collate_fn=functools.partial(collate, tokenizer=tokenizer),
    )


class ShardedShuffle(torch.utils.data.Sampler):
    """The order DataLoader(shuffle=True, generator) gives one process, cut into global batches of
    batch_size * world clips (an incomplete one dropped: a batch norm needs two clips), of which `rank` takes
    its contiguous batch_size: `world` processes (torchrun) see exactly the batches of one process with the
    global batch size. Grouped (--group_by_length), each run of 50 global batches is sorted by length
    before it is cut: clips of similar length together, in new batches each epoch. `skip`: the global batches
    of the next pass to leave out (a run resumed within an epoch goes on in the same order), then 0."""

    def __init__(self, lengths, batch_size, rank, world, generator, grouped=False):
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.lengths, self.generator, self.grouped = lengths, generator, grouped
        self.skip = 0

    def __iter__(self):
        n = len(self.lengths)
        perm = torch.randperm(n, generator=self.generator)
        torch.randperm(n, generator=self.generator)  # RandomSampler draws two an epoch
        size = self.batch_size * self.world
        perm = perm[: n // size * size]
        # grouped, as transformers' LengthGroupedSampler does: runs of 50 global batches, each sorted
        if self.grouped:
            runs = perm.split(50 * size)
            perm = torch.cat([run[self.lengths[run].argsort(descending=True)] for run in runs])
        mine = perm.view(-1, self.world, self.batch_size)[self.skip :, self.rank]
        self.skip = 0
        yield from mine.flatten().tolist()

    def __len__(self):
        return len(self.lengths) // (self.batch_size * self.world) * self.batch_size


def to_device(batch, device):
    return dict(
        batch,
        inputs={k: v.to(device) for k, v in batch["inputs"].items()},
        label=batch["label"].to(device),
    )


def autocast(device):
    """bfloat16 compute on a GPU (the 4-bit layers' compute dtype), float32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
