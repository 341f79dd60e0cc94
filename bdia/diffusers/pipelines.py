"""Exact inversion and editing through diffusers pipelines: ``invert``, ``sample``, ``encode``, ``decode``.

One walk serves every pipeline family; a family (``Family``) only says what its pipeline means by its components:
which network denoises and how it takes its time, how prompts become conditioning and how guidance combines it,
the latents' layout (Flux packs 2x2 patches into tokens) and the grid its pipeline asks its scheduler for.

- Stable Diffusion 1/2 (``UNet2DConditionModel``): text embeddings; classifier-free guidance in one batched call.
- Stable Diffusion XL: two text encoders, pooled embeddings and size/crop ``time_ids``; batched CFG.
- Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``, flow matching): pooled projections; batched CFG; the
  scheduler's shift (or dynamic shifting by the image's token count).
- Flux (``FluxTransformer2DModel``, flow matching): packed latents, text and image ids, the distilled guidance
  embedding, true CFG with a negative prompt where asked (two calls, as the pipeline makes them), dynamic shifting.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

import bdia
from bdia import State
from bdia.diffusers.adapters import (
    _is_flow,
    _Net,
    discrete_timestep,
    flow_grid,
    flow_timestep,
    flux_timestep,
    model_over,
    timesteps_from,
)
from bdia.models import CFG
from bdia.sampling import Step, check, cut, locate
from bdia.solvers import BDIA, DDIM, Euler
from bdia.state import check_state

__all__ = ["FAMILIES", "Family", "decode", "encode", "family_of", "invert", "sample"]

Net = Callable[..., torch.Tensor]


class _TwoCalls:
    """True classifier-free guidance as Flux's pipeline makes it: the conditional and the negative prediction in
    two network calls (its ids are not batched), combined as ``neg + scale (pos - neg)``."""

    def __init__(self, net: Net, scale: float, **negative: Any):
        self.net, self.scale, self.negative = net, scale, negative

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        pos = self.net(x, t, **cond)
        neg = self.net(x, t, **self.negative)
        return neg + self.scale * (pos - neg)


class Conditioning:
    """What a family's prompts give a walk: the network's keywords, and how guidance wraps the network."""

    def __init__(self, cond: dict[str, Any], guide: Callable[[Net], Net] | None = None):
        self.cond, self.guide = cond, guide or (lambda net: net)


def _batched_cfg(scale: float, uncond: dict[str, Any]) -> Callable[[Net], Net]:
    return lambda net: CFG(net, scale, **uncond)


class Family:
    """A pipeline family: what its components mean to a walk. Subclasses override what differs.

    ``network``: the component that denoises; ``flow``: whether it is a flow-matching model; ``keywords``: the
    pipeline's own keyword names that ``invert`` / ``sample`` take for it (the prompt's and the guidance's);
    ``needs``: what a pipeline must have to be one of this family (named when a pipeline is refused).
    """

    name = ""
    network = "unet"
    flow = False
    keywords: frozenset[str] = frozenset()
    needs: tuple[str, ...] = ("vae", "scheduler", "encode_prompt", "image_processor")

    def matches(self, pipe: Any) -> bool:
        raise NotImplementedError

    def missing(self, pipe: Any) -> list[str]:
        """What ``pipe`` lacks of this family's components (for the refusal of an unknown pipeline)."""
        return [a for a in (self.network, *self.needs) if getattr(pipe, a, None) is None]

    def timestep(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The network's timestep for grid time ``t`` (see ``bdia.diffusers.adapters``)."""
        return (flow_timestep if self.flow else discrete_timestep)(t, x)

    # the latents' layout ------------------------------------------------------------------------------

    def latent_size(self, pipe: Any, height: int, width: int) -> tuple[int, int]:
        """The latent height and width of an image of ``height`` x ``width`` pixels."""
        return height // pipe.vae_scale_factor, width // pipe.vae_scale_factor

    def size(self, pipe: Any, latents: torch.Tensor, height: int | None, width: int | None) -> tuple[int, int]:
        """The image size (pixels) that ``latents`` (in the pipeline's layout) stand for: ``height`` / ``width`` if
        given (they must agree with the latents), else the latents' size times the VAE's scale factor."""
        if latents.dim() != 4:
            raise ValueError(f"latents must be (batch, channels, height, width), got shape {tuple(latents.shape)}")
        f = pipe.vae_scale_factor
        sides = []
        for given, side, name in ((height, latents.shape[-2], "height"), (width, latents.shape[-1], "width")):
            if given is not None and given // f != side:
                raise ValueError(f"{name}={given} disagrees with the latents, which stand for {side * f} pixels")
            sides.append(given or side * f)
        return sides[0], sides[1]

    def default_size(self, pipe: Any, height: int | None, width: int | None) -> tuple[int, int]:
        """The pipeline's image size when none is given: ``default_sample_size * vae_scale_factor`` (Stable
        Diffusion 1/2: the UNet's ``sample_size``)."""
        samples = getattr(pipe, "default_sample_size", None) or getattr(pipe, self.network).config.sample_size
        side = samples * pipe.vae_scale_factor
        return height or side, width or side

    def noise_shape(self, pipe: Any, batch: int, height: int, width: int) -> tuple[int, ...]:
        return (batch, getattr(pipe, self.network).config.in_channels, *self.latent_size(pipe, height, width))

    def pack(self, pipe: Any, z: torch.Tensor) -> torch.Tensor:
        """VAE-shaped latents in the pipeline's layout (the identity but for Flux)."""
        return z

    def unpack(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return latents

    def is_latent(self, pipe: Any, x: torch.Tensor) -> bool:
        """Whether a tensor is latents in the pipeline's layout (else an image, or an error)."""
        vae = pipe.vae.config
        if x.dim() == 4 and x.shape[1] == vae.latent_channels != vae.in_channels:
            return True
        if x.dim() != 4 or x.shape[1] != vae.in_channels:
            raise ValueError(
                f"a tensor must be latents ({vae.latent_channels} channels) or images ({vae.in_channels} channels), "
                f"got shape {tuple(x.shape)}"
            )
        return False

    # the grid and the conditioning ----------------------------------------------------------------------

    def grid(
        self, pipe: Any, n: int, latents: torch.Tensor, size: tuple[int, int], sigmas: Any, mu: Any
    ) -> torch.Tensor:
        """The grid the pipeline walks for ``n`` steps."""
        if sigmas is not None or mu is not None:
            raise ValueError(f"sigmas and mu are for flow-matching pipelines, not {self.name}'s")
        return timesteps_from(pipe.scheduler, n)

    def conditioning(
        self,
        pipe: Any,
        device: torch.device,
        prompt: Any,
        options: dict,
        guidance_scale: float,
        batch: int,
        images: int,
        size: tuple[int, int],
    ) -> Conditioning:
        raise NotImplementedError

    def guided(self, pipe: Any, guidance_scale: float) -> bool:
        """The pipeline's rule: classifier-free guidance when ``guidance_scale > 1``."""
        return guidance_scale > 1


def _fit(e: torch.Tensor | None, batch: int, name: str) -> torch.Tensor | None:
    """Embeddings for a batch of latents: as many, or one broadcast to all."""
    if e is None or e.shape[0] == batch:
        return e
    if e.shape[0] == 1:
        return e.expand(batch, *e.shape[1:])
    raise ValueError(
        f"{name} gives {e.shape[0]} embeddings for a batch of {batch} latents: give one {name} for all of them, or "
        f"latents with a batch of {e.shape[0]} (one per embedding)"
    )


def _take(options: dict, *names: str) -> dict:
    return {k: options[k] for k in names if k in options}


class StableDiffusion(Family):
    """Stable Diffusion 1.x / 2.x: a ``UNet2DConditionModel`` without additional conditioning."""

    name = "Stable Diffusion 1/2"
    keywords = frozenset({"negative_prompt", "prompt_embeds", "negative_prompt_embeds", "clip_skip"})

    def matches(self, pipe: Any) -> bool:
        from diffusers import UNet2DConditionModel

        unet = getattr(pipe, "unet", None)
        return isinstance(unet, UNet2DConditionModel) and unet.config.addition_embed_type is None

    def conditioning(self, pipe, device, prompt, options, guidance_scale, batch, images, size) -> Conditioning:
        guided = self.guided(pipe, guidance_scale)
        embeds, negative = pipe.encode_prompt(
            prompt=prompt,
            device=device,
            num_images_per_prompt=images,
            do_classifier_free_guidance=guided,
            **_take(options, "negative_prompt", "prompt_embeds", "negative_prompt_embeds", "clip_skip"),
        )
        cond = {"encoder_hidden_states": _fit(embeds, batch, "prompt")}
        if not guided:
            return Conditioning(cond)
        return Conditioning(
            cond, _batched_cfg(guidance_scale, {"encoder_hidden_states": _fit(negative, batch, "negative_prompt")})
        )


class StableDiffusionXL(StableDiffusion):
    """Stable Diffusion XL (base): two text encoders; the UNet's additional conditioning is the pooled embedding
    and six ``time_ids`` (original size, crop's top-left corner, target size)."""

    name = "Stable Diffusion XL"
    keywords = frozenset(
        {
            "prompt_2",
            "negative_prompt",
            "negative_prompt_2",
            "prompt_embeds",
            "negative_prompt_embeds",
            "pooled_prompt_embeds",
            "negative_pooled_prompt_embeds",
            "clip_skip",
            "original_size",
            "crops_coords_top_left",
            "target_size",
            "negative_original_size",
            "negative_crops_coords_top_left",
            "negative_target_size",
        }
    )

    def matches(self, pipe: Any) -> bool:
        from diffusers import UNet2DConditionModel

        unet = getattr(pipe, "unet", None)
        return isinstance(unet, UNet2DConditionModel) and unet.config.addition_embed_type == "text_time"

    def guided(self, pipe: Any, guidance_scale: float) -> bool:
        if pipe.unet.config.time_cond_proj_dim is not None:
            raise ValueError(
                "this SDXL UNet takes a guidance embedding (time_cond_proj_dim: a guidance- or LCM-distilled model), "
                "which bdia.diffusers does not cover"
            )
        if getattr(pipe.config, "requires_aesthetics_score", False):
            raise ValueError("SDXL refiner pipelines (aesthetic-score time ids) are not covered; use the base pipeline")
        return guidance_scale > 1

    def conditioning(self, pipe, device, prompt, options, guidance_scale, batch, images, size) -> Conditioning:
        guided = self.guided(pipe, guidance_scale)
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt,
            prompt_2=options.get("prompt_2"),
            device=device,
            num_images_per_prompt=images,
            do_classifier_free_guidance=guided,
            **_take(
                options,
                "negative_prompt",
                "negative_prompt_2",
                "prompt_embeds",
                "negative_prompt_embeds",
                "pooled_prompt_embeds",
                "negative_pooled_prompt_embeds",
                "clip_skip",
            ),
        )

        def time_ids(original, crop, target) -> torch.Tensor:
            ids = [*(original or size), *(crop or (0, 0)), *(target or size)]
            return _fit(torch.tensor([ids], dtype=embeds.dtype, device=device), batch, "time_ids")

        ids = time_ids(options.get("original_size"), options.get("crops_coords_top_left"), options.get("target_size"))
        cond = {
            "encoder_hidden_states": _fit(embeds, batch, "prompt"),
            "added_cond_kwargs": {"text_embeds": _fit(pooled, batch, "prompt"), "time_ids": ids},
        }
        if not guided:
            return Conditioning(cond)
        if options.get("negative_original_size") is not None and options.get("negative_target_size") is not None:
            negative_ids = time_ids(
                options["negative_original_size"],
                options.get("negative_crops_coords_top_left"),
                options["negative_target_size"],
            )
        else:  # as the pipeline: the negative branch sees the same sizes
            negative_ids = ids
        uncond = {
            "encoder_hidden_states": _fit(negative, batch, "negative_prompt"),
            "added_cond_kwargs": {
                "text_embeds": _fit(negative_pooled, batch, "negative_prompt"),
                "time_ids": negative_ids,
            },
        }
        return Conditioning(cond, _batched_cfg(guidance_scale, uncond))


def _mu(config: Any, seq_len: int, max_shift: float) -> float:
    """The amount of dynamic shifting for ``seq_len`` image tokens: linear in the token count, from ``base_shift``
    at ``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len`` (the pipelines' rule, its arithmetic in
    the same order so that the grid is theirs to the bit)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", max_shift)
    m = (top - base) / (max_len - base_len)
    b = base - m * base_len
    return seq_len * m + b


class StableDiffusion3(Family):
    """Stable Diffusion 3 / 3.5: an ``SD3Transformer2DModel`` (flow matching) conditioned on the joint text
    embeddings and the pooled projections; batched classifier-free guidance."""

    name = "Stable Diffusion 3"
    network = "transformer"
    flow = True
    keywords = frozenset(
        {
            "prompt_2",
            "prompt_3",
            "negative_prompt",
            "negative_prompt_2",
            "negative_prompt_3",
            "prompt_embeds",
            "negative_prompt_embeds",
            "pooled_prompt_embeds",
            "negative_pooled_prompt_embeds",
            "clip_skip",
            "max_sequence_length",
        }
    )

    def matches(self, pipe: Any) -> bool:
        from diffusers import SD3Transformer2DModel

        return isinstance(getattr(pipe, "transformer", None), SD3Transformer2DModel)

    def grid(self, pipe, n, latents, size, sigmas, mu) -> torch.Tensor:
        config = pipe.scheduler.config
        if config.get("use_dynamic_shifting", False) and mu is None:
            patch = pipe.transformer.config.patch_size
            h, w = self.latent_size(pipe, *size)
            mu = _mu(config, (h // patch) * (w // patch), max_shift=1.16)  # (SD3's pipeline's default)
        return flow_grid(config, n, sigmas=sigmas, mu=mu)[0]

    def conditioning(self, pipe, device, prompt, options, guidance_scale, batch, images, size) -> Conditioning:
        guided = self.guided(pipe, guidance_scale)
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt,
            prompt_2=options.get("prompt_2"),
            prompt_3=options.get("prompt_3"),
            device=device,
            num_images_per_prompt=images,
            do_classifier_free_guidance=guided,
            **_take(
                options,
                "negative_prompt",
                "negative_prompt_2",
                "negative_prompt_3",
                "prompt_embeds",
                "negative_prompt_embeds",
                "pooled_prompt_embeds",
                "negative_pooled_prompt_embeds",
                "clip_skip",
                "max_sequence_length",
            ),
        )
        cond = {
            "encoder_hidden_states": _fit(embeds, batch, "prompt"),
            "pooled_projections": _fit(pooled, batch, "prompt"),
        }
        if not guided:
            return Conditioning(cond)
        uncond = {
            "encoder_hidden_states": _fit(negative, batch, "negative_prompt"),
            "pooled_projections": _fit(negative_pooled, batch, "negative_prompt"),
        }
        return Conditioning(cond, _batched_cfg(guidance_scale, uncond))


class Flux(Family):
    """Flux: a ``FluxTransformer2DModel`` (flow matching) on latents packed 2x2 into tokens, with text and image
    ids, pooled projections and (guidance-distilled models) a guidance embedding of ``guidance_scale``; true CFG
    with a negative prompt when ``true_cfg_scale > 1``, as the pipeline offers it."""

    name = "Flux"
    network = "transformer"
    flow = True
    keywords = frozenset(
        {
            "prompt_2",
            "negative_prompt",
            "negative_prompt_2",
            "true_cfg_scale",
            "prompt_embeds",
            "pooled_prompt_embeds",
            "negative_prompt_embeds",
            "negative_pooled_prompt_embeds",
            "max_sequence_length",
        }
    )
    needs = (*Family.needs, "_pack_latents", "_unpack_latents", "_prepare_latent_image_ids")

    def matches(self, pipe: Any) -> bool:
        from diffusers import FluxTransformer2DModel

        return isinstance(getattr(pipe, "transformer", None), FluxTransformer2DModel)

    def timestep(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return flux_timestep(t, x)

    def latent_size(self, pipe: Any, height: int, width: int) -> tuple[int, int]:
        # the VAE's 8x (here vae_scale_factor) and the 2x2 packing: latent sides are even
        f = pipe.vae_scale_factor * 2
        return 2 * (int(height) // f), 2 * (int(width) // f)

    def size(self, pipe, latents, height, width) -> tuple[int, int]:
        if latents.dim() != 3:
            raise ValueError(
                f"Flux latents are packed tokens (batch, tokens, channels), got shape {tuple(latents.shape)}"
            )
        height, width = self.default_size(pipe, height, width)
        h, w = self.latent_size(pipe, height, width)
        if (h // 2) * (w // 2) != latents.shape[1]:
            raise ValueError(
                f"the latents hold {latents.shape[1]} tokens, but height={height}, width={width} give "
                f"{(h // 2) * (w // 2)}: pass the height and width of the image they stand for"
            )
        return height, width

    def noise_shape(self, pipe, batch, height, width) -> tuple[int, ...]:
        return (batch, pipe.transformer.config.in_channels // 4, *self.latent_size(pipe, height, width))

    def pack(self, pipe, z) -> torch.Tensor:
        return type(pipe)._pack_latents(z, *z.shape)

    def unpack(self, pipe, latents, height, width) -> torch.Tensor:
        return type(pipe)._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    def is_latent(self, pipe, x) -> bool:
        if x.dim() == 3:
            return True
        if x.dim() == 4 and x.shape[1] == pipe.vae.config.in_channels:
            return False
        raise ValueError(
            f"Flux latents are packed tokens (batch, tokens, channels), as encode returns them, and images have "
            f"{pipe.vae.config.in_channels} channels; got shape {tuple(x.shape)}"
        )

    def grid(self, pipe, n, latents, size, sigmas, mu) -> torch.Tensor:
        config = pipe.scheduler.config
        if mu is not None:
            raise ValueError("mu: Flux's pipeline computes it from the image's token count; it takes no mu")
        if sigmas is None and not config.get("use_flow_sigmas", False):
            sigmas = np.linspace(1.0, 1 / n, n)  # the pipeline's
        h, w = self.latent_size(pipe, *size)
        shift = _mu(config, (h // 2) * (w // 2), max_shift=1.15) if config.get("use_dynamic_shifting", False) else None
        return flow_grid(config, n, sigmas=sigmas, mu=shift)[0]

    def conditioning(self, pipe, device, prompt, options, guidance_scale, batch, images, size) -> Conditioning:
        common = {"device": device, "num_images_per_prompt": images, **_take(options, "max_sequence_length")}
        embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=prompt,
            prompt_2=options.get("prompt_2"),
            prompt_embeds=options.get("prompt_embeds"),
            pooled_prompt_embeds=options.get("pooled_prompt_embeds"),
            **common,
        )
        h, w = self.latent_size(pipe, *size)
        image_ids = type(pipe)._prepare_latent_image_ids(batch, h // 2, w // 2, device, embeds.dtype)
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(batch)
        cond = {
            "encoder_hidden_states": _fit(embeds, batch, "prompt"),
            "pooled_projections": _fit(pooled, batch, "prompt"),
            "txt_ids": text_ids,
            "img_ids": image_ids,
            "guidance": guidance,
        }
        true_cfg = options.get("true_cfg_scale", 1.0)
        negative_given = options.get("negative_prompt") is not None or (
            options.get("negative_prompt_embeds") is not None
            and options.get("negative_pooled_prompt_embeds") is not None
        )
        if not (true_cfg > 1 and negative_given):  # the pipeline's rule
            return Conditioning(cond)
        negative, negative_pooled, negative_ids = pipe.encode_prompt(
            prompt=options.get("negative_prompt"),
            prompt_2=options.get("negative_prompt_2"),
            prompt_embeds=options.get("negative_prompt_embeds"),
            pooled_prompt_embeds=options.get("negative_pooled_prompt_embeds"),
            **common,
        )
        uncond = {
            **cond,
            "encoder_hidden_states": _fit(negative, batch, "negative_prompt"),
            "pooled_projections": _fit(negative_pooled, batch, "negative_prompt"),
            "txt_ids": negative_ids,
        }
        return Conditioning(cond, lambda net: _TwoCalls(net, true_cfg, **uncond))


FAMILIES: tuple[Family, ...] = (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux())


def family_of(pipe: Any) -> Family:
    """The family of ``pipe`` (by its denoising network), or a ``TypeError`` naming what it lacks."""
    for family in FAMILIES:
        if family.matches(pipe) and not family.missing(pipe):
            return family
    nearest = min(FAMILIES, key=lambda f: len(f.missing(pipe)))
    lacks = nearest.missing(pipe)
    what = (
        f"lacks {', '.join(lacks)}"
        if lacks
        else f"has a {type(getattr(pipe, nearest.network)).__name__} as {nearest.network}"
    )
    covered = "; ".join(f"{f.name} ({f.network}, {', '.join(f.needs)})" for f in FAMILIES)
    raise TypeError(
        f"pipe must be a Stable Diffusion-family pipeline of one of: {covered}; got {type(pipe).__name__}, which "
        f"{what} (nearest: {nearest.name})"
    )


# ----------------------------------------------------------------------------------------- the VAE


def _vae_normalisation(vae: Any, like: torch.Tensor) -> tuple[Any, Any, float]:
    """``(mean, std, scale)`` with the pipeline's latents ``(z - mean) * scale / std`` for the VAE's ``z``:
    ``mean`` the per-channel ``latents_mean`` (SDXL-style VAEs) or ``shift_factor`` (SD3, Flux) or 0."""
    c = vae.config
    mean, std = getattr(c, "latents_mean", None), getattr(c, "latents_std", None)
    if mean is not None and std is not None:
        on = {"device": like.device, "dtype": like.dtype}
        shape = (1, len(mean), *([1] * (like.dim() - 2)))
        return torch.tensor(mean, **on).reshape(shape), torch.tensor(std, **on).reshape(shape), c.scaling_factor
    return getattr(c, "shift_factor", None) or 0.0, None, c.scaling_factor


def _device(pipe: Any) -> torch.device:
    return getattr(pipe, "_execution_device", None) or pipe.device


def encode(pipe: Any, image: Any, *, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """An image's latents in the pipeline's own format: the VAE's posterior mean (deterministic), normalised as the
    pipeline normalises them (``(z - shift_factor) * scaling_factor``; SDXL-style ``latents_mean`` / ``latents_std``)
    and packed for Flux; what ``pipe(..., output_type="latent")`` returns is in the same format. ``image``: PIL
    image(s), arrays or a tensor as ``pipe.image_processor.preprocess`` takes them (resized to ``height`` x
    ``width`` if given)."""
    family = family_of(pipe)
    with torch.no_grad():
        return _encode(pipe, family, image, height, width, _device(pipe))[0]


def _encode(pipe, family, image, height, width, device) -> tuple[torch.Tensor, tuple[int, int]]:
    """The latents of ``image`` and its size in pixels (after the image processor's resizing)."""
    pixels = pipe.image_processor.preprocess(image, height=height, width=width)
    z = pipe.vae.encode(pixels.to(device=device, dtype=pipe.vae.dtype)).latent_dist.mode()
    mean, std, scale = _vae_normalisation(pipe.vae, z)
    z = (z - mean) * scale
    return family.pack(pipe, z if std is None else z / std), (pixels.shape[-2], pixels.shape[-1])


def decode(
    pipe: Any, latents: torch.Tensor, *, height: int | None = None, width: int | None = None, output_type: str = "pil"
) -> Any:
    """Latents in the pipeline's format (``encode``'s, or ``sample(..., output_type="latent")``'s) to images, as the
    pipeline decodes them: unpacked (Flux: ``height`` / ``width``, default the pipeline's), un-normalised,
    through the VAE, the safety checker or watermark if the pipeline has one, and ``output_type`` (``"pil"``,
    ``"np"``, ``"pt"``; ``"latent"`` returns ``latents``)."""
    family = family_of(pipe)
    with torch.no_grad():
        return _decode(pipe, family, latents, family.size(pipe, latents, height, width), output_type, _device(pipe))


def _decode(pipe, family, latents, size, output_type, device) -> Any:
    if output_type == "latent":
        return latents
    z = family.unpack(pipe, latents, *size)
    mean, std, scale = _vae_normalisation(pipe.vae, z)
    z = (z if std is None else z * std) / scale + mean
    image = pipe.vae.decode(z.to(pipe.vae.dtype), return_dict=False)[0]
    keep = None
    if getattr(pipe, "safety_checker", None) is not None and hasattr(pipe, "run_safety_checker"):
        image, nsfw = pipe.run_safety_checker(image, device, image.dtype)
        keep = None if nsfw is None else [not flagged for flagged in nsfw]
    if getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=keep)


# ------------------------------------------------------------------------------------------- the walk


@functools.cache
def _parameters(cls: type) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(cls.__call__).parameters)


def _default(pipe: Any, name: str, given: Any) -> Any:
    """``given``, or the pipeline's own default for its keyword ``name``."""
    if given is not None:
        return given
    p = _parameters(type(pipe)).get(name)
    if p is None or p.default is inspect.Parameter.empty:
        raise ValueError(f"give {name}= ({type(pipe).__name__} has no default for it)")
    return p.default


def _check_options(pipe: Any, family: Family, options: dict, caller: str) -> None:
    for key in options:
        if key in family.keywords:
            continue
        if key in _parameters(type(pipe)):
            raise ValueError(
                f"{caller}: {type(pipe).__name__}'s keyword {key!r} is not supported by bdia.diffusers (it takes "
                f"{', '.join(sorted(family.keywords))})"
            )
        raise TypeError(
            f"{caller}() got an unexpected keyword argument {key!r}: {type(pipe).__name__} has no such keyword "
            f"(for the prompt it takes {', '.join(sorted(family.keywords))})"
        )


def _prompts(prompt: Any, options: dict) -> int:
    """How many prompts were given (a string is one), as the pipelines count them."""
    if prompt is None and options.get("prompt_embeds") is None:
        raise ValueError('give prompt (a string, "" for none) or prompt_embeds')
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list | tuple):
        return len(prompt)
    return options["prompt_embeds"].shape[0]


def _walk(
    pipe: Any,
    x: Any,
    forward: bool,
    prompt: Any,
    *,
    num_inference_steps: int | None,
    guidance_scale: float | None,
    strength: float | None,
    gamma: float | None,
    solver: Any,
    height: int | None,
    width: int | None,
    sigmas: Any,
    mu: Any,
    generator: Any,
    num_images_per_prompt: int,
    progress: bool,
    callback: Callable[[Step], bool | None] | None,
    callback_on_step_end: Callable | None,
    options: dict,
) -> State:
    """The one walk: everything ``invert`` and ``sample`` do, for every family (``forward``: sampling)."""
    caller = "sample" if forward else "invert"
    family = family_of(pipe)
    _check_options(pipe, family, options, caller)
    if family.flow != _is_flow(pipe.scheduler):
        kind = "a flow-matching model" if family.flow else "a discrete diffusion model"
        raise TypeError(
            f"{type(pipe).__name__}'s {family.network} is {kind}, but its scheduler is {type(pipe.scheduler).__name__}"
        )
    n = _default(pipe, "num_inference_steps", num_inference_steps)
    scale = _default(pipe, "guidance_scale", guidance_scale)
    if solver is None:
        if gamma is None:
            gamma = pipe.scheduler.config.gamma if "gamma" in pipe.scheduler.config else 1.0
        solver = BDIA(Euler() if family.flow else DDIM(), gamma)
    elif gamma is not None:
        raise ValueError("give gamma or solver, not both (gamma configures the default BDIA solver)")
    if generator is not None and x is not None:
        raise ValueError("generator draws the starting noise of sample(pipe, None, ...); latents were given")
    prompts = _prompts(prompt, options)
    device = _device(pipe)
    dtype = getattr(pipe, family.network).dtype
    # the latents the walk starts from: a pair, latents, an image (through the VAE), or noise drawn as the pipeline
    if isinstance(x, State):
        start: torch.Tensor | State = check_state(x, "latents" if forward else "image_or_latents")
        latents = x.x
    elif x is None:
        h, w = family.default_size(pipe, height, width)
        shape = family.noise_shape(pipe, prompts * num_images_per_prompt, h, w)
        start = latents = family.pack(pipe, randn_tensor(shape, generator=generator, device=device, dtype=dtype))
    elif isinstance(x, torch.Tensor) and (forward or family.is_latent(pipe, x)):
        start = latents = x.to(device)
    elif forward:
        raise TypeError(f"latents must be a bdia.State (from invert) or a tensor, got {type(x).__name__}")
    else:
        start, (height, width) = _encode(pipe, family, x, height, width, device)
        latents = start
    size = family.size(pipe, latents, height, width)
    # where the walk runs on the grid: all checked before any network sees the latents
    grid = family.grid(pipe, n, latents, size, sigmas, mu).tolist()
    if forward:
        if isinstance(start, State):
            start, k = _locate(start, grid, solver, n, "latents")
            walk = grid[max(k - 1, 0) :]  # from the pair on
            if strength is not None and cut(grid, strength)[0] != walk[0]:
                raise ValueError(
                    f"strength={strength} starts at t = {cut(grid, strength)[0]}, but the pair starts at "
                    f"t = {walk[0]}: leave strength out to continue the pair where it is"
                )
        else:
            walk = cut(grid, strength)
    else:
        walk = cut(grid, 1.0 if strength is None else strength)
        if isinstance(start, State):
            start, k = _locate(start, walk[::-1], solver, n, "image_or_latents")
            walk = walk[: len(walk) - max(k - 1, 0)]  # from the pair on
    # everything the walk refuses (amplification, non-finite input, ...) before the text encoders run
    ts = torch.tensor(walk, dtype=torch.float64)
    network = _Net(getattr(pipe, family.network), family.timestep)
    check(model_over(network, pipe.scheduler), start, ts, solver, forward=forward)
    # the conditioning (the text encoders' calls) and the model
    conditioning = family.conditioning(
        pipe, device, prompt, options, scale, latents.shape[0], num_images_per_prompt, size
    )
    model = model_over(conditioning.guide(network), pipe.scheduler)
    steps = _callbacks(pipe, family, callback, callback_on_step_end)
    run = bdia.sample if forward else bdia.invert
    return run(model, start, ts, solver, progress=progress, callback=steps, **conditioning.cond)


def _locate(pair: State, walk: list[float], solver: Any, n: int, name: str) -> tuple[State, int]:
    """Where a given pair sits on the walk, and whether ``solver`` continues it (``bdia.sampling.locate``)."""
    try:
        return locate(pair, walk, solver, name=name)
    except ValueError as e:
        raise ValueError(
            f"{e}, the walk of num_inference_steps={n}: use the num_inference_steps, size and scheduler "
            "configuration of the walk that made it"
        ) from None


def _callbacks(pipe: Any, family: Family, callback: Any, on_step_end: Any) -> Callable[[Step], bool | None] | None:
    """``callback(step)`` (bdia's) and ``callback_on_step_end(pipe, i, t, {"latents": ...})`` (the pipelines'), in
    one callback. A walk keeps its pair, so the pipelines' callback may read the latents but not replace them."""
    if on_step_end is None:
        return callback

    def each(step: Step) -> bool | None:
        stop = callback(step) if callback is not None else None
        latents = step.state.x
        t = family.timestep(torch.tensor([step.t], dtype=torch.float64), latents)[0]
        out = on_step_end(pipe, step.i - 1, t, {"latents": latents}) or {}
        back = out.get("latents", latents)
        if back is not latents and not torch.equal(back, latents):
            raise ValueError(
                "callback_on_step_end returned other latents: a walk through bdia.diffusers keeps its pair of "
                "latents, which an edit would break; edit latents in a pipeline run with a BDIA scheduler, whose "
                "step takes the edited latent"
            )
        return stop

    return each


def invert(
    pipe: Any,
    image_or_latents: Any,
    prompt: str | list[str] | None = None,
    *,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    strength: float = 1.0,
    gamma: float | None = None,
    solver: Any = None,
    height: int | None = None,
    width: int | None = None,
    sigmas: Any = None,
    mu: float | None = None,
    num_images_per_prompt: int = 1,
    progress: bool = False,
    callback: Callable[[Step], bool | None] | None = None,
    callback_on_step_end: Callable | None = None,
    **prompt_options: Any,
) -> State:
    """Invert an image (PIL image(s), arrays or a tensor in the pipeline's image format), latents (in the pipeline's
    format, ``encode``'s), or a pair (``bdia.State``, e.g. ``pipe.scheduler.state`` after sampling with a BDIA
    scheduler) to the noise of the pipeline's grid, with BDIA (over DDIM, or Euler for flow-matching pipelines)
    under the pipeline's own guidance and conditioning.

    Returns the pair (``bdia.State``) that ``sample`` continues from. Images go through the VAE (posterior mean);
    a lone latent's first step is one plain integrator step (the only approximation), a pair is inverted exactly.
    ``strength`` < 1 inverts only the last ``int(strength * num_inference_steps)`` steps, as img2img counts them;
    a pair continues from where it lies. ``num_inference_steps`` and ``guidance_scale``: the pipeline's defaults
    unless given. ``gamma``: the scheduler's if it is a BDIA one, else 1 (the exactly invertible choice);
    ``solver`` replaces the BDIA solver (e.g. ``bdia.solvers.DDIM()`` for classic approximate inversion).
    ``prompt_options``: the pipeline's own prompt keywords (``negative_prompt``, ``prompt_embeds``, ``prompt_2``,
    ``pooled_prompt_embeds``, ``max_sequence_length``, ``true_cfg_scale``, ...; ``Family.keywords`` lists each
    family's). ``progress``, ``callback(step)``: ``bdia.invert``'s; ``callback_on_step_end``: the pipelines'.
    """
    with torch.no_grad():
        return _walk(
            pipe,
            image_or_latents,
            False,
            prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            strength=strength,
            gamma=gamma,
            solver=solver,
            height=height,
            width=width,
            sigmas=sigmas,
            mu=mu,
            generator=None,
            num_images_per_prompt=num_images_per_prompt,
            progress=progress,
            callback=callback,
            callback_on_step_end=callback_on_step_end,
            options=prompt_options,
        )


def sample(
    pipe: Any,
    latents: torch.Tensor | State | None = None,
    prompt: str | list[str] | None = None,
    *,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    strength: float | None = None,
    gamma: float | None = None,
    solver: Any = None,
    height: int | None = None,
    width: int | None = None,
    sigmas: Any = None,
    mu: float | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    num_images_per_prompt: int = 1,
    output_type: str = "pil",
    progress: bool = False,
    callback: Callable[[Step], bool | None] | None = None,
    callback_on_step_end: Callable | None = None,
    **prompt_options: Any,
) -> Any:
    """Sample through the pipeline's components and decode: from a pair that ``invert`` returned (editing: pass
    another prompt; the same prompt rebuilds the inverted latent), from latents at the grid's start, or from noise
    drawn as the pipeline draws it (``latents=None``, with ``generator``; ``num_images_per_prompt`` per prompt).

    A pair continues from where it lies on the grid (a partial inversion's pair continues its partial walk;
    ``strength``, if given, must agree). A lone tensor is a latent at the grid's start (``strength``: part way).
    ``output_type``: ``"pil"``, ``"np"``, ``"pt"`` (the pipeline's image formats) or ``"latent"`` (the pipeline's
    latent format, comparable with ``encode``). The other keywords are ``invert``'s.
    """
    with torch.no_grad():
        state = _walk(
            pipe,
            latents,
            True,
            prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            strength=strength,
            gamma=gamma,
            solver=solver,
            height=height,
            width=width,
            sigmas=sigmas,
            mu=mu,
            generator=generator,
            num_images_per_prompt=num_images_per_prompt,
            progress=progress,
            callback=callback,
            callback_on_step_end=callback_on_step_end,
            options=prompt_options,
        )
        family = family_of(pipe)
        size = family.size(pipe, state.x, height, width)
        return _decode(pipe, family, state.x, size, output_type, _device(pipe))
