"""Tiny random-init models built locally (never downloaded), for the demo and the tests.

`build_tiny_model(DIR, arch)` writes a model folder that loads with `from_pretrained(DIR)`:
- arch "internvl": transformers' InternVLForConditionalGeneration (a Qwen2 language model, an
  InternViT-style vision tower, the pixel-shuffle projector) with 56-px tiles of 14-px patches,
  i.e. 4 image tokens per tile after the 0.5 pixel shuffle, up to 6 tiles + thumbnail per image;
- arch "qwen2" / "llama": text-only causal LMs.
All share one tokenizer made with the `tokenizers` library: byte-level BPE (every byte is a
token; a handful of merges), InternVL's image tokens (<img>, </img>, <IMG_CONTEXT>) and a ChatML
chat template. The image processor is GotOcr2's (InternVL's dynamic tiling); processor_config.json
is written by hand because InternVLProcessor cannot be instantiated without torchvision, while
AutoProcessor reads that file wherever torchvision exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHS = ("internvl", "qwen2", "llama")
TILE, PATCH, DOWNSAMPLE, MAX_PATCHES = 56, 14, 0.5, 6
IMAGE_SEQ_LENGTH = int((TILE // PATCH) ** 2 * DOWNSAMPLE**2)  # tokens per tile
IMG_START, IMG_END, IMG_CONTEXT, VIDEO = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMG_START, IMG_END, IMG_CONTEXT, VIDEO]
# Frequent pairs in English text and in the demo's reasoning; the rest stays byte-level.
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("Ġ", "s"), ("o", "n")]
TEXT = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              image_size=TILE, patch_size=PATCH, attention_bias=True, use_mean_pooling=True)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2's pre-tokenization split (words, single digits, punctuation runs, newlines, spaces).
SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def build_tokenizer():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import TokenizersBackend

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, unk_token=None, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    return TokenizersBackend(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        bos_token=None, chat_template=CHAT_TEMPLATE,
        # read by InternVLProcessor (tokenizer.start_image_token, ...)
        extra_special_tokens={"start_image_token": IMG_START, "end_image_token": IMG_END,
                              "context_image_token": IMG_CONTEXT, "video_token": VIDEO},
    )


def build_config(arch: str, tokenizer):
    from transformers import InternVLConfig, LlamaConfig, Qwen2Config

    ids = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
               pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None,
               tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(**TEXT, **ids)
    if arch == "llama":
        return LlamaConfig(**TEXT, **ids)
    config = InternVLConfig(
        text_config=dict(model_type="qwen2", **TEXT, **ids), vision_config=VISION,
        image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT), image_seq_length=IMAGE_SEQ_LENGTH,
        downsample_ratio=DOWNSAMPLE, projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=True)
    config.architectures = ["InternVLForConditionalGeneration"]
    return config


def _image_processor():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1,
                                    max_patches=MAX_PATCHES, image_mean=[0.485, 0.456, 0.406],
                                    image_std=[0.229, 0.224, 0.225])


def _processor_config(image_processor) -> dict:
    """What InternVLProcessor.save_pretrained writes (its nested v5 form)."""
    image = image_processor.to_dict()
    image["image_processor_type"] = "GotOcr2ImageProcessor"  # backend-neutral; Auto* picks one
    video = {"video_processor_type": "InternVLVideoProcessor", "size": {"height": TILE, "width": TILE},
             "image_mean": image["image_mean"], "image_std": image["image_std"], "do_resize": True,
             "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
             "resample": 3}
    return {"image_processor": image, "video_processor": video, "image_seq_length": IMAGE_SEQ_LENGTH,
            "processor_class": "InternVLProcessor"}


def build_tiny_model(out_dir: str | Path, arch: str = "internvl", *, seed: int = 0) -> Path:
    """Write a tiny random-init model folder (weights, config, tokenizer, processor files)."""
    from transformers import AutoModelForCausalLM, InternVLForConditionalGeneration

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = build_config(arch, tokenizer)
    torch.manual_seed(seed)
    if arch == "internvl":
        model = InternVLForConditionalGeneration(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    model.to(torch.float32).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if arch == "internvl":
        image_processor = _image_processor()
        image_processor.save_pretrained(out_dir)
        (out_dir / "processor_config.json").write_text(
            json.dumps(_processor_config(image_processor), indent=2, sort_keys=True) + "\n")
    return out_dir
