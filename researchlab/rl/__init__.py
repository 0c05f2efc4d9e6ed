"""Functional RL primitives in pure JAX (seed 002): advantages, policy losses, KL, rewards, reference updates.

Written by hand (nbdev leaves it alone): every public name of the `researchlab.rl` modules is re-exported here.
"""

from researchlab.rl.advantages import *  # noqa: E402
from researchlab.rl.algorithms import *  # noqa: E402
from researchlab.rl.kl import *  # noqa: E402
from researchlab.rl.losses import *  # noqa: E402
from researchlab.rl.reference import *  # noqa: E402
from researchlab.rl.rewards import *  # noqa: E402
