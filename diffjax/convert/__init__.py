"""Released checkpoints into diffjax: safe readers of PyTorch weight files (``torch_file``)
and converters of their state dicts (``guided_diffusion``: OpenAI's ADM / improved-diffusion).

    params = diffjax.convert.load_checkpoint("64x64_diffusion.pt", experiment)

Nothing here imports torch (nor flax: the converters are NumPy). Importing this package has
no side effects. The command line is ``python -m diffjax.convert`` (``__main__``).
"""

from diffjax.convert.guided_diffusion import load_checkpoint

__all__ = ["load_checkpoint"]
