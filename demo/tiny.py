"""Tiny LLaVA artifacts built from config, fully offline: for tests, the README's default run and the CPU demo.

    python -m demo.tiny OUT_DIR [--preset test|demo] [--corpus FILE] [--version v1] [--seed 0]

The model is a real `LlavaForConditionalGeneration` (CLIP vision tower + projector + Llama decoder) with a
byte-level BPE tokenizer trained on the given corpus, saved with `train.artifact.save_artifact` exactly as a
fine-tuned model is. Every Linear that bitsandbytes quantises has in_features that are multiples of 64, because
bnb's CPU 4-bit inference kernel repacks weights in blocks of 64 (other sizes fail with a reshape error).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from train.templates import LLAMA_2_SYSTEM, V1_SYSTEM

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


@dataclass(frozen=True)
class TinyPreset:
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    vocab_size: int
    max_positions: int
    vision_feature_layer: int


PRESETS = {
    # Fast enough for every test; text dims are multiples of 64 for the 4-bit path.
    "test": TinyPreset(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=4,
                       text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, vocab_size=400,
                       max_positions=512, vision_feature_layer=-2),
    # Sized to learn chart type and title on 2 CPU cores in minutes, where step count matters more than size: in the
    # same time a 4.9 M-parameter model got 544 steps against this one's ~1870, and never learned titles.
    # vision_feature_layer=-1: on a 2-layer tower, LLaVA's usual -2 would silently read layer 1 only.
    "demo": TinyPreset(image_size=96, patch_size=12, vision_hidden=128, vision_layers=2, vision_heads=2,
                       text_hidden=128, text_layers=2, text_heads=2, text_kv_heads=2, vocab_size=400,
                       max_positions=512, vision_feature_layer=-1),
}

DEFAULT_CORPUS = [
    V1_SYSTEM, LLAMA_2_SYSTEM,
    "USER: What is shown in the image? ASSISTANT: A chart.",
    "What type of chart is this? pie donut funnel bar line chart. What is the title of the chart?",
    "Which category is the largest? Which category is the smallest? How many categories are there?",
    "What percentage is Teachers? 15% 20% 25% 1,000 2.5 yes no red green blue orange purple",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100",
]


def train_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (any text is encodable) with LLaVA's special tokens, left padding for batching."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left")


def build_tiny_model_and_processor(preset: str = "test", corpus: list[str] | None = None, *,
                                   version: str = "v1", seed: int = 0):
    """A randomly initialised tiny LLaVA and its configured processor (not saved)."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from train.artifact import configure_processor

    p = PRESETS[preset]
    tokenizer = train_tokenizer(DEFAULT_CORPUS + list(corpus or []), p.vocab_size)
    image_processor = CLIPImageProcessor(size={"shortest_edge": p.image_size},
                                         crop_size={"height": p.image_size, "width": p.image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=p.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>")
    configure_processor(processor, version=version, image_aspect_ratio="pad")

    vision = CLIPVisionConfig(image_size=p.image_size, patch_size=p.patch_size, hidden_size=p.vision_hidden,
                              intermediate_size=4 * p.vision_hidden, num_hidden_layers=p.vision_layers,
                              num_attention_heads=p.vision_heads, projection_dim=p.vision_hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=p.text_hidden, intermediate_size=4 * p.text_hidden,
                       num_hidden_layers=p.text_layers, num_attention_heads=p.text_heads,
                       num_key_value_heads=p.text_kv_heads, max_position_embeddings=p.max_positions,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=(p.image_size // p.patch_size) ** 2,
                         vision_feature_select_strategy="default", vision_feature_layer=p.vision_feature_layer,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    return model, processor


def build_tiny_artifact(out_dir: str | Path, preset: str = "test", corpus: list[str] | None = None, *,
                        version: str = "v1", seed: int = 0, max_new_tokens: int = 16) -> Path:
    """Build and save a tiny artifact in the exact layout a training run produces."""
    from train.artifact import save_artifact

    model, processor = build_tiny_model_and_processor(preset, corpus, version=version, seed=seed)
    return save_artifact(out_dir, model, processor,
                         generation_defaults={"max_new_tokens": max_new_tokens},
                         training_config={"made_by": "demo.tiny", "preset": preset, "version": version,
                                          "seed": seed, "image_aspect_ratio": "pad"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="test")
    parser.add_argument("--corpus", help="text file whose lines train the tokenizer (plus a small default corpus)")
    parser.add_argument("--version", default="v1", help="chat template (see train/templates.py)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    corpus = Path(args.corpus).read_text().splitlines() if args.corpus else None
    out = build_tiny_artifact(args.out_dir, args.preset, corpus, version=args.version, seed=args.seed)
    log.info("tiny %s artifact written to %s", args.preset, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
