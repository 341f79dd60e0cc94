"""Pipelines with tiny random weights, built offline from configs: Stable Diffusion 1.5, SDXL, SD3, Flux, and Wan
(text to video).

Each is the real diffusers pipeline class with every component built from a small config, seeded random weights
and every module in ``.eval()`` (a module built from a config starts in training mode: a T5 keeps its dropout on
and no walk would be reproducible); tokenizers are loaded from files written in a temporary folder (a letters-only
CLIP vocabulary; a letters-only unigram model for T5, the kind of model ``T5Tokenizer`` reads). 16x16 images,
milliseconds per step on a CPU: for tests, examples and benchmarks of code that drives a pipeline (their images are
noise). The schedulers are the published configurations of the models they stand in for.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["tiny_flux_pipeline", "tiny_pipeline", "tiny_sd3_pipeline", "tiny_sdxl_pipeline", "tiny_wan_pipeline"]

# Stable Diffusion 1.5's scheduler configuration (its published scheduler_config.json)
_SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
# Stable Diffusion XL 1.0's (base)
_SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
# Stable Diffusion 3 and 3.5's
_SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
# FLUX.1-dev's
_FLUX_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


def _clip_vocab() -> dict[str, int]:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        vocab.update({c + suffix: len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    return vocab


def _clip_text(hidden: int, layers: int = 1, projection: int | None = None) -> Any:
    """A CLIP text encoder (with a projection head if ``projection``: SDXL's second and SD3's encoders)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(_clip_vocab()),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=2,
        num_hidden_layers=layers,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=projection or hidden,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(d_model: int, umt5: bool = False) -> Any:
    """A one-layer T5 encoder (Wan's UMT5 with ``umt5``) over the letters-only T5 vocabulary."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_class(
        vocab_size=30,
        d_model=d_model,
        d_ff=2 * d_model,
        d_kv=4,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return model_class(config)


def _vae(scaling_factor: float, shift_factor: float | None = None) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def _clip_tokenizer(folder: Path) -> Any:
    """A letters-only CLIP tokenizer (8 tokens): a vocabulary file and no merges, the classic way to load one."""
    from transformers import CLIPTokenizer

    (folder / "vocab.json").write_text(json.dumps(_clip_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=8)


def _t5_tokenizer(folder: Path) -> Any:
    """A letters-only T5 tokenizer (8 tokens): a unigram model over the letters and the word boundary, written as
    a tokenizers file (``T5Tokenizer`` reads a unigram vocabulary, as T5's own is)."""
    from tokenizers import Tokenizer, models
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_lowercase]
    Tokenizer(models.Unigram(pieces, unk_id=2)).save(str(folder / "tokenizer.json"))
    return T5Tokenizer.from_pretrained(folder, model_max_length=8, extra_ids=0)


def _tokenizers() -> tuple[Any, Any]:
    with tempfile.TemporaryDirectory() as folder:
        return _clip_tokenizer(Path(folder)), _t5_tokenizer(Path(folder))


def _finish(pipe: Any, dtype: torch.dtype) -> Any:
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            # torch's own conversion of floating-point tensors (diffusers' .to(dtype) warns about fp32 modules)
            torch.nn.Module.to(module, dtype).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unet(cross_attention_dim: int, **extra: Any) -> Any:
    """The tiny pipelines' cross-attention UNet: 4x8x8 latents, two levels of 8 and 16 channels."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=4,
        cross_attention_dim=cross_attention_dim,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        **extra,
    )


def tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A ``StableDiffusionPipeline`` with tiny random weights: a cross-attention ``UNet2DConditionModel``, an
    ``AutoencoderKL``, a one-layer ``CLIPTextModel`` with a letters-only tokenizer (8 tokens), and Stable Diffusion
    1.5's scheduler configuration. 16x16 images, 4x8x8 latents."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _unet(cross_attention_dim=16)
        vae = _vae(scaling_factor=0.18215)
        text = _clip_text(16)
    tokenizer, _ = _tokenizers()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(_SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _finish(pipe, dtype)


def tiny_sdxl_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A ``StableDiffusionXLPipeline`` with tiny random weights: a UNet with SDXL's additional conditioning (pooled
    text embeddings and size/crop ``time_ids``), two two-layer CLIP text encoders (the second with a projection,
    whose output is the pooled embedding; SDXL reads the penultimate layer), an ``AutoencoderKL`` and SDXL 1.0's
    scheduler configuration (``EulerDiscreteScheduler``). 16x16 images, 4x8x8 latents."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _unet(
            cross_attention_dim=32,  # the two encoders' hidden states, concatenated
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=6 * 4 + 16,  # six time ids, and the pooled embedding
        )
        vae = _vae(scaling_factor=0.13025)
        text, text_2 = _clip_text(16, layers=2), _clip_text(16, layers=2, projection=16)
    tokenizer, _ = _tokenizers()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text,
        text_encoder_2=text_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(_SDXL_SCHEDULER),
        add_watermarker=False,
    )
    return _finish(pipe, dtype)


def tiny_sd3_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A ``StableDiffusion3Pipeline`` with tiny random weights: an ``SD3Transformer2DModel`` (patch 2), two CLIP
    text encoders with projections (their pooled outputs are the pooled projections), a T5 encoder, an
    ``AutoencoderKL`` with a shift factor, and SD3's scheduler configuration (``FlowMatchEulerDiscreteScheduler``,
    shift 3). 16x16 images, 4x8x8 latents; pass ``max_sequence_length=8`` (the T5 tokenizer's length)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,  # T5's width, to which the CLIP states are padded
            caption_projection_dim=16,
            pooled_projection_dim=16,  # the two CLIP projections, concatenated
            out_channels=4,
            pos_embed_max_size=8,
        )
        vae = _vae(scaling_factor=1.5035, shift_factor=0.0609)
        text, text_2, text_3 = _clip_text(8, projection=8), _clip_text(8, projection=8), _t5(16)
    tokenizer, tokenizer_3 = _tokenizers()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(_SD3_SCHEDULER),
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        text_encoder_2=text_2,
        tokenizer_2=tokenizer,
        text_encoder_3=text_3,
        tokenizer_3=tokenizer_3,
    )
    return _finish(pipe, dtype)


def tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, guidance_embeds: bool = True) -> Any:
    """A ``FluxPipeline`` with tiny random weights: a ``FluxTransformer2DModel`` (one double and one single block,
    with the distilled guidance embedding unless ``guidance_embeds=False``, as FLUX.1-schnell), a CLIP text
    encoder (pooled output), a T5 encoder, an ``AutoencoderKL`` with a shift factor, and FLUX.1-dev's scheduler
    configuration (dynamic shifting). 16x16 images by default (``default_sample_size`` is set to 8), 4x8x8
    latents packed 2x2 into 16 tokens of 16 channels; pass ``max_sequence_length=8``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels, packed 2x2
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,  # T5's width
            pooled_projection_dim=16,  # CLIP's
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(2, 2, 4),
        )
        vae = _vae(scaling_factor=0.3611, shift_factor=0.1159)
        text, text_2 = _clip_text(16), _t5(16)
    tokenizer, tokenizer_2 = _tokenizers()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(_FLUX_SCHEDULER),
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        text_encoder_2=text_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.default_sample_size = 8  # (FluxPipeline sets 128: 256x256 images by default)
    return _finish(pipe, dtype)


def tiny_wan_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A ``WanPipeline`` (text to video, flow matching) with tiny random weights: a one-block
    ``WanTransformer3DModel``, a ``UMT5EncoderModel`` with the letters-only T5 tokenizer, an ``AutoencoderKLWan``
    and ``FlowMatchEulerDiscreteScheduler`` with shift 3. 16x16 frames; 5 frames give latents of 16 channels,
    2 latent frames of 2x2; pass ``max_sequence_length=8``. (No ``Family`` describes it: drive its transformer with
    ``model_from``; its pipeline takes ``BDIAFlowMatchScheduler``.)"""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=16,  # the T5's width
            freq_dim=256,
            ffn_dim=32,
            num_layers=1,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
        text = _t5(16, umt5=True)
    _, tokenizer = _tokenizers()
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )
    return _finish(pipe, dtype)
