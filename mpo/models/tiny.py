"""Tiny random-init models built locally (never downloaded), for the demo and the tests.

`build_tiny_model(DIR, arch)` writes a model folder that loads with `from_pretrained(DIR)`:
- arch "internvl": transformers' InternVLForConditionalGeneration (a Qwen2 language model, an
  InternViT-style vision tower, the pixel-shuffle projector) with 56-px tiles of 14-px patches,
  i.e. 4 image tokens per tile after the 0.5 pixel shuffle, up to 6 tiles + thumbnail per image;
- arch "internvl_qwen3_moe": the same with a Qwen3-MoE language model (InternVL3.5-30B-A3B's shape);
- arch "internvl_gpt_oss": the same with a GPT-OSS language model (InternVL3.5-GPT-OSS-20B-A4B's
  shape: attention sinks, a 24-token sliding-window layer then a global one);
- arch "qwen2_vl" / "qwen2_5_vl" / "qwen3_vl" / "qwen3_vl_moe": transformers' Qwen*VLForConditionalGeneration
  (M-RoPE language model, the family's vision tower and merger) with the Qwen2-VL image processor
  sized for 1 to 16 image tokens per image (28 or 32-px merged patches);
- arch "gemma3": transformers' Gemma3ForConditionalGeneration (a SigLIP tower on 56-px images pooled
  to 4 tokens; a sliding-window layer of 24 tokens, shorter than most pairs, then a global one);
- arch "qwen2" / "llama": text-only causal LMs.
The mixtures of experts have 4 experts of which 2 serve each token in every layer; like the released
models they leave `output_router_logits` off (no load-balancing loss unless loss.router_aux_coef asks).
All share one tokenizer made with the `tokenizers` library: byte-level BPE (every byte is a
token; a handful of merges), InternVL's image tokens (<img>, </img>, <IMG_CONTEXT>) and a ChatML
chat template; the Qwen-VL ones add Qwen's vision tokens and render an image as
<|vision_start|><|image_pad|><|vision_end|> as Qwen's template does, the Gemma 3 one Gemma's image
tokens (<start_of_image>, <end_of_image>, <image_soft_token>). processor_config.json is
written by hand because the processors cannot be instantiated without torchvision, while
AutoProcessor reads that file wherever torchvision exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHS = ("internvl", "internvl_qwen3_moe", "internvl_gpt_oss", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe",
         "gemma3", "qwen2", "llama")
INTERNVL = ("internvl", "internvl_qwen3_moe", "internvl_gpt_oss")
QWEN_VL = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
TILE, PATCH, DOWNSAMPLE, MAX_PATCHES = 56, 14, 0.5, 6
IMAGE_SEQ_LENGTH = int((TILE // PATCH) ** 2 * DOWNSAMPLE**2)  # tokens per tile
IMG_START, IMG_END, IMG_CONTEXT, VIDEO = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMG_START, IMG_END, IMG_CONTEXT, VIDEO]
QWEN_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
GEMMA_IMAGE_TOKENS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
GEMMA_TEXT = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=24,
                  layer_types=["sliding_attention", "full_attention"])
GEMMA_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    image_size=TILE, patch_size=PATCH)
GEMMA_TOKENS_PER_IMAGE = 4  # the 4 x 4 patches average-pooled to 2 x 2
# Frequent pairs in English text and in the demo's reasoning; the rest stays byte-level.
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("Ġ", "s"), ("o", "n")]
TEXT = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1,
           norm_topk_prob=True, router_aux_loss_coef=0.001)
# GPT-OSS: intermediate_size is an expert's; the load-balancing coefficient is the released model's
GPT_OSS = dict(model_type="gpt_oss", head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=24,
               layer_types=["sliding_attention", "full_attention"], router_aux_loss_coef=0.9)
# M-RoPE: mrope_section splits head_dim / 2 = 8 frequency pairs over (t, h, w)
QWEN_TEXT = {"qwen2_vl": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2])),
             "qwen2_5_vl": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2])),
             "qwen3_vl": dict(head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                mrope_section=[4, 2, 2], mrope_interleaved=True))}
QWEN_TEXT["qwen3_vl_moe"] = {**QWEN_TEXT["qwen3_vl"], **MOE}
QWEN_VISION = {
    "qwen2_vl": dict(depth=1, embed_dim=32, hidden_size=TEXT["hidden_size"], num_heads=2, mlp_ratio=2, patch_size=14),
    "qwen2_5_vl": dict(depth=2, hidden_size=32, out_hidden_size=TEXT["hidden_size"], intermediate_size=64,
                       num_heads=2, patch_size=14, window_size=56, fullatt_block_indexes=[1]),
    "qwen3_vl": dict(depth=2, hidden_size=32, out_hidden_size=TEXT["hidden_size"], intermediate_size=64,
                     num_heads=2, patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0]),
}
QWEN_VISION["qwen3_vl_moe"] = QWEN_VISION["qwen3_vl"]
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              image_size=TILE, patch_size=PATCH, attention_bias=True, use_mean_pooling=True)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ 'IMAGE' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2's pre-tokenization split (words, single digits, punctuation runs, newlines, spaces).
SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


IMAGE_MARKUP = {"internvl": "<IMG_CONTEXT>\n", "qwen_vl": "<|vision_start|><|image_pad|><|vision_end|>",
                "gemma3": "<start_of_image>"}


def build_tokenizer(arch: str = "internvl"):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import TokenizersBackend

    qwen = arch in QWEN_VL
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
    special = SPECIAL_TOKENS + (QWEN_VISION_TOKENS if qwen else []) + (GEMMA_IMAGE_TOKENS if arch == "gemma3" else [])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    # read by the processors (tokenizer.start_image_token, tokenizer.image_token, ...)
    named = {"start_image_token": IMG_START, "end_image_token": IMG_END, "context_image_token": IMG_CONTEXT,
             "video_token": VIDEO}
    if qwen:
        named = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                 "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"}
    if arch == "gemma3":
        named = {"boi_token": GEMMA_IMAGE_TOKENS[0], "eoi_token": GEMMA_IMAGE_TOKENS[1],
                 "image_token": GEMMA_IMAGE_TOKENS[2]}
    markup = IMAGE_MARKUP["qwen_vl" if qwen else arch if arch == "gemma3" else "internvl"]
    template = CHAT_TEMPLATE.replace("IMAGE", markup.replace("\n", "\\n"))
    return TokenizersBackend(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        bos_token=None, chat_template=template, extra_special_tokens=named,
    )


def build_config(arch: str, tokenizer):
    from transformers import AutoConfig, InternVLConfig, LlamaConfig, Qwen2Config

    ids = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
               pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None,
               tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(**TEXT, **ids)
    if arch == "llama":
        return LlamaConfig(**TEXT, **ids)
    if arch in QWEN_VL:
        tokens = {f"{k}_token_id": tokenizer.convert_tokens_to_ids(t) for k, t in
                  (("image", "<|image_pad|>"), ("video", "<|video_pad|>"), ("vision_start", "<|vision_start|>"),
                   ("vision_end", "<|vision_end|>"))}
        config = AutoConfig.for_model(arch, text_config=dict(**TEXT, **ids, **QWEN_TEXT[arch]),
                                      vision_config=QWEN_VISION[arch], tie_word_embeddings=True, **tokens)
        config.architectures = [type(config).__name__.replace("Config", "ForConditionalGeneration")]
        return config
    if arch == "gemma3":
        image = {f"{k}_token_index": tokenizer.convert_tokens_to_ids(t) for k, t in
                 zip(("boi", "eoi", "image"), GEMMA_IMAGE_TOKENS)}
        config = AutoConfig.for_model("gemma3", text_config=dict(**TEXT, **ids, **GEMMA_TEXT),
                                      vision_config=dict(model_type="siglip_vision_model", **GEMMA_VISION),
                                      mm_tokens_per_image=GEMMA_TOKENS_PER_IMAGE, tie_word_embeddings=True, **image)
        config.architectures = ["Gemma3ForConditionalGeneration"]
        return config
    text = dict(model_type="qwen2")
    if arch == "internvl_qwen3_moe":
        text = dict(model_type="qwen3_moe", head_dim=16, **MOE)
    if arch == "internvl_gpt_oss":
        text = dict(GPT_OSS, intermediate_size=MOE["moe_intermediate_size"])
    config = InternVLConfig(
        text_config={**TEXT, **ids, **text}, vision_config=VISION,
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


def _qwen_processor_config(arch: str) -> dict:
    """The Qwen2-VL image processor sized for 1 to 16 merged patches per image, in the processor's
    nested v5 form (the video half as the family's processor writes it)."""
    patch = QWEN_VISION[arch]["patch_size"]
    merged = patch * 2
    image = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": patch, "merge_size": 2,
             "temporal_patch_size": 2, "size": {"shortest_edge": merged ** 2, "longest_edge": 16 * merged ** 2},
             "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
             "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
             "do_convert_rgb": True, "resample": 3}
    names = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL", "qwen3_vl": "Qwen3VL", "qwen3_vl_moe": "Qwen3VL"}
    video = {**image, "video_processor_type": f"{'Qwen2VL' if names[arch] != 'Qwen3VL' else 'Qwen3VL'}VideoProcessor"}
    del video["image_processor_type"]
    return {"image_processor": image, "video_processor": video, "processor_class": f"{names[arch]}Processor"}


def _gemma3_processor_config() -> dict:
    """Gemma3ImageProcessor at the tower's 56 px, pan-and-scan off, in the processor's nested form."""
    image = {"image_processor_type": "Gemma3ImageProcessor", "size": {"height": TILE, "width": TILE},
             "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_resize": True, "do_rescale": True,
             "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True, "resample": 2,
             "do_pan_and_scan": False}
    return {"image_processor": image, "image_seq_length": GEMMA_TOKENS_PER_IMAGE, "processor_class": "Gemma3Processor"}


def build_tiny_model(out_dir: str | Path, arch: str = "internvl", *, seed: int = 0) -> Path:
    """Write a tiny random-init model folder (weights, config, tokenizer, processor files)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(arch)
    config = build_config(arch, tokenizer)
    torch.manual_seed(seed)
    vision = arch in INTERNVL or arch in QWEN_VL or arch == "gemma3"
    model = (AutoModelForImageTextToText if vision else AutoModelForCausalLM).from_config(config)
    if arch == "gemma3":  # transformers starts the projector at zero (images invisible until trained)
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.1)
    model.to(torch.float32).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    processor = None
    if arch in INTERNVL:
        image_processor = _image_processor()
        image_processor.save_pretrained(out_dir)
        processor = _processor_config(image_processor)
    elif arch in QWEN_VL:
        processor = _qwen_processor_config(arch)
        (out_dir / "preprocessor_config.json").write_text(json.dumps(processor["image_processor"], indent=2) + "\n")
    elif arch == "gemma3":
        processor = _gemma3_processor_config()
        (out_dir / "preprocessor_config.json").write_text(json.dumps(processor["image_processor"], indent=2) + "\n")
    if processor is not None:
        (out_dir / "processor_config.json").write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")
    return out_dir
