"""``import diffjax`` (and its sub-packages) has no side effects.

grain and orbax install a stderr logging handler when *they* are imported; diffjax.data,
train and checkpoint import them, so the probe imports those two first and checks that
diffjax itself adds nothing.
"""

import subprocess
import sys

PROBE = """
import logging, sys
import jax
before = logging.getLogger().handlers[:]
import diffjax, diffjax.diffusion.schedules, diffjax.diffusion.losses, diffjax.configlib
assert logging.getLogger().handlers == before, "logging was configured at import"
import grain, orbax.checkpoint
before = logging.getLogger().handlers[:]
import diffjax, diffjax.diffusion.schedules, diffjax.diffusion.samplers, diffjax.models.unet
import diffjax.configlib, diffjax.data, diffjax.train.loop, diffjax.generate
from jax._src import xla_bridge
from absl import flags
assert not xla_bridge._backends, "a JAX backend was initialised at import"
assert logging.getLogger().handlers == before, "logging was configured at import"
assert not flags.FLAGS.is_parsed(), "flags were parsed at import"
assert "diffjax.main" not in sys.modules
print("clean")
"""


def test_import_has_no_side_effects():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "clean", out.stderr[-3000:]
