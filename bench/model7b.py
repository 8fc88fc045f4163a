"""The model bench.gpu measures: LLaVA-1.5-7B's shape with random bf16 weights, built from config (no hub).

    path = build_7b_artifact(out_dir, "cuda")      # saved as a training run saves its model dir (13.5 GB)

CLIP ViT-L/14-336 vision tower, Vicuna-7B text model (vocab 32064), 2-layer GELU projector, and a byte-level BPE
tokenizer trained offline (its few hundred tokens are all the prompts need; ids past it decode to nothing, which
does not matter for speed).
"""

from __future__ import annotations

from pathlib import Path

from bench.load import QUESTION


def llava15_7b_config(image_token_index: int, pad_token_id: int, bos: int, eos: int):
    """LLaVA-1.5-7B's architecture (llava-hf/llava-1.5-7b-hf config), without downloading anything."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad_token_id,
                       tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_index,
                       image_seq_length=576, vision_feature_select_strategy="default", vision_feature_layer=-2,
                       projector_hidden_act="gelu", pad_token_id=pad_token_id)


def build_7b_artifact(out_dir: Path, device: str) -> Path:
    """Random bf16 LLaVA-1.5-7B-shaped model + offline tokenizer/processor, saved as a training run saves one."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from bench.preprocess import llava15_processor
    from demo.tiny import DEFAULT_CORPUS, train_tokenizer
    from train.artifact import save_artifact

    processor = llava15_processor(train_tokenizer(DEFAULT_CORPUS + [QUESTION], vocab_size=32064))
    tokenizer = processor.tokenizer
    config = llava15_7b_config(tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id,
                               tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # 13.5 GB instead of 27 GB while building
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    path = save_artifact(out_dir, model, processor, generation_defaults={"max_new_tokens": 64},
                         training_config={"made_by": "bench.gpu", "shape": "llava-1.5-7b", "weights": "random"})
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return path
