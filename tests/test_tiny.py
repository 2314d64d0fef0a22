"""The tiny Thinker's files (tiny/) are what this code makes: a byte-level BPE tokenizer trained on TINY_CORPUS
with the Omni special tokens, the Qwen2.5-Omni processor around it, and bench.common.thinker_config of bench.common.TINY's
shapes. Run with WRITE_TINY=1 to write them again."""

import json
import os

from backbone import TINY_FILES
from bench.common import TINY, thinker_config


def tiny_processor():
    from transformers import (
        Qwen2_5OmniProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        WhisperFeatureExtractor,
    )

    return Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(),
        video_processor=Qwen2VLVideoProcessor(),
        feature_extractor=WhisperFeatureExtractor(feature_size=128),
        tokenizer=tiny_tokenizer(),
    )


def tiny_tokenizer():
    """A byte-level BPE of 512 tokens with the Omni special tokens, trained in a second on TINY_CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    media = dict(
        image_token="<|IMAGE|>",
        video_token="<|VIDEO|>",
        audio_token="<|AUDIO|>",
        vision_bos_token="<|vision_bos|>",
        vision_eos_token="<|vision_eos|>",
        audio_bos_token="<|audio_bos|>",
        audio_eos_token="<|audio_eos|>",
    )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        [TINY_CORPUS],
        trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", *media.values()],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return Qwen2TokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        extra_special_tokens=media,
    )


TINY_CORPUS = (
    """system user assistant You are an expert in multimodal sentiment analysis. How positive or
negative is the speaker's opinion in this clip? Answer with a sentiment score from -3 (very negative) to 3
(very positive). Transcript: the movie the plot the acting the soundtrack the ending was is it i think well
honestly really very good great bad awful okay fine -3.0 -2.5 -2.0 -1.5 -1.0 -0.5 0.0 0.5 1.0 1.5 2.0 2.5 3.0
"""
    * 4
)


def test_the_tiny_files_are_what_this_code_makes(tmp_path):
    from transformers import GenerationConfig

    processor = tiny_processor()
    config = thinker_config(processor.tokenizer, **TINY)
    config.architectures = [
        "Qwen2_5OmniThinkerForConditionalGeneration"
    ]  # what saving a model adds
    config.dtype = "float32"
    generation = GenerationConfig.from_model_config(config.text_config)
    folder = TINY_FILES if os.environ.get("WRITE_TINY") else tmp_path
    processor.save_pretrained(folder)
    config.save_pretrained(folder)
    generation.save_pretrained(folder)
    names = ("config.json", "generation_config.json", "processor_config.json", "tokenizer.json")
    for name in (*names, "tokenizer_config.json"):
        assert settings(folder / name) == settings(TINY_FILES / name), name


def settings(path):
    """A file's settings, less the version of transformers that wrote it (a newer release writes its own)."""
    written = json.loads(path.read_text())
    written.pop("transformers_version", None)
    return written
