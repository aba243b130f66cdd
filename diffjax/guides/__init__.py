"""Log densities for gradient guidance (``guidance.type = "gradient"``), one module per domain.

Each is a pure JAX function ``log_density(x [B, H, W, C], sigma [B], cond) -> [B]`` named in a
config as ``--config.guidance.log_density=diffjax.guides.fashion_mnist:brighter``; a user's
own lives in any importable module and is named the same way. Importing these modules does
nothing but define functions.
"""
