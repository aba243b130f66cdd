"""Released checkpoints into diffjax: a safe reader of PyTorch weight files (``torch_file``)
and converters of their state dicts, one module per family:

* ``guided_diffusion``: OpenAI's ADM / improved-diffusion UNets, upsamplers, classifiers;
* ``dit``: facebookresearch/DiT's ``.pt`` files and diffusers' ``DiTTransformer2DModel``;
* ``autoencoder_kl``: Stable Diffusion's VAE (diffusers or CompVis/LDM key names);
* ``sd_unet``: Stable Diffusion's UNet (diffusers' ``UNet2DConditionModel`` or CompVis/LDM
  key names);
* ``clip_text``: SD 1.x's text encoder (transformers' ``CLIPTextModel``, or a whole SD
  checkpoint's ``cond_stage_model``) and SD 2.x's (OpenCLIP's names) ->
  :class:`diffjax.models.clip_text.CLIPTextModel`.

    params = diffjax.convert.load_checkpoint("64x64_diffusion.pt", experiment)

:func:`load_checkpoint` picks the converter from the experiment's network. Nothing here
imports torch; importing this package has no side effects. The command line is
``python -m diffjax.convert`` (``__main__``).
"""

from __future__ import annotations

import os
from typing import Any

from diffjax.convert import autoencoder_kl, guided_diffusion, sd_unet
from diffjax.convert import dit as dit_convert
from diffjax.models import autoencoder as autoencoder_model
from diffjax.models import dit as dit_model
from diffjax.models import unet as unet_model


def load_checkpoint(path: str | os.PathLike, config: Any, key: str | None = None) -> dict:
    """The diffjax parameters of a released weight file for ``config``'s network.

    path: ``.pt`` / ``.pth`` / ``.ckpt`` (read without torch, nothing in it executed) or
    ``.safetensors``; config: the resolved experiment (``diffjax.experiment.load(...)``) or
    its task; key: the entry of the file holding the state dict, if it holds several (e.g.
    ``"ema"``). A DiT experiment reads DiT's or diffusers' names
    (:mod:`diffjax.convert.dit`), an autoencoder's diffusers' or CompVis/LDM names
    (:mod:`diffjax.convert.autoencoder_kl`; a whole SD ``.ckpt`` gives its
    ``first_stage_model``), a context-conditioned UNet (``model.context_dim`` > 0)
    diffusers' or CompVis/LDM's SD UNet names (:mod:`diffjax.convert.sd_unet`; a whole SD
    ``.ckpt`` gives its ``model.diffusion_model``), any other guided-diffusion's
    (:mod:`diffjax.convert.guided_diffusion`). Returns NumPy arrays in the config's
    parameter dtypes. Raises WeightFileError (or its subclass ConversionError): one line.
    """
    task = getattr(config, "task", config)
    model = getattr(task, "model", None)
    if isinstance(model, dit_model.DiT):
        return dit_convert.load_checkpoint(path, model, key)
    if isinstance(model, autoencoder_model.AutoencoderKL):
        return autoencoder_kl.load_checkpoint(path, model, key)
    if isinstance(model, unet_model.UNet) and model.context_dim > 0:
        return sd_unet.load_checkpoint(path, task, key)
    return guided_diffusion.load_checkpoint(path, task, key)


__all__ = ["load_checkpoint"]
