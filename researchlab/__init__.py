"""researchlab: a Jupyter-first workbench for ML and RL research in JAX.

The public names of the library modules (design, tracking, rl) are re-exported here
(`from researchlab import Config, Loop, ...`). The worked examples stay in their own modules and are
imported where used: `researchlab.ppo` (PPO on gymnax), `researchlab.cartpole_render`,
`researchlab.grpo_tiny`; so `import researchlab` does not import gymnax.
This file is written by hand; nbdev leaves it alone.
"""

__version__ = "0.0.1"

from researchlab.design.core import *  # noqa: E402
from researchlab.design.infra import *  # noqa: E402
from researchlab.design.loop import *  # noqa: E402
from researchlab.design.utils import *  # noqa: E402
from researchlab.design.visualizer import *  # noqa: E402
from researchlab.rl import *  # noqa: E402
from researchlab.tracking.magic import load_ipython_extension  # noqa: E402, F401
from researchlab.tracking.tracker import *  # noqa: E402
from researchlab.tracking.utils import *  # noqa: E402
