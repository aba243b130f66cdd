"""diffjax: diffusion-model research in JAX/Flax.

Importing this package has no side effects: no device is initialised, no logging is
configured, no flag is parsed. Import the sub-packages you need::

    from diffjax.diffusion import schedules, process, losses, samplers, guidance
    from diffjax.models import unet
"""

__version__ = "0.1.0"
