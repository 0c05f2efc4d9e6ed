"""researchlab: a Jupyter-first workbench for ML and RL research in JAX.

The public names of every module are re-exported here (`from researchlab import Config, Loop, ...`).
This file is written by hand; nbdev leaves it alone.
"""

__version__ = "0.0.1"

from researchlab.cartpole_render import *  # noqa: E402
from researchlab.design.core import *  # noqa: E402
from researchlab.design.infra import *  # noqa: E402
from researchlab.design.loop import *  # noqa: E402
from researchlab.design.utils import *  # noqa: E402
from researchlab.design.visualizer import *  # noqa: E402
from researchlab.grpo_tiny import *  # noqa: E402
from researchlab.ppo import *  # noqa: E402
from researchlab.rl import *  # noqa: E402
from researchlab.tracking.magic import load_ipython_extension  # noqa: E402, F401
from researchlab.tracking.tracker import *  # noqa: E402
from researchlab.tracking.utils import *  # noqa: E402
