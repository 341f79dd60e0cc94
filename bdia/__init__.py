"""bdia: exactly invertible diffusion ODE solvers (BDIA, O-BELM, EDICT, DDIM inversion) in pure PyTorch.

``bdia.sample`` and ``bdia.invert`` walk a float64 time grid with a solver from ``bdia.solvers`` over a
denoiser from ``bdia.models`` and a schedule from ``bdia.schedules``; both return a ``bdia.State``.
"""

from bdia import exact, gradients, metrics, models, schedules, solvers, zoo
from bdia.models import Prediction
from bdia.sampling import invert, sample
from bdia.state import State

__all__ = [
    "Prediction",
    "State",
    "exact",
    "gradients",
    "invert",
    "metrics",
    "models",
    "sample",
    "schedules",
    "solvers",
    "zoo",
]
__version__ = "0.1.0"
