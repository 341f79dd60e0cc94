"""bdia: exactly invertible diffusion ODE solvers (BDIA, O-BELM, EDICT, DDIM inversion) in pure PyTorch.

``bdia.sample`` and ``bdia.invert`` walk a float64 time grid with a solver from ``bdia.solvers`` over a
denoiser from ``bdia.models`` and a schedule from ``bdia.schedules``; both return a ``bdia.State``.
"""

from bdia import exact, gradients, models, schedules, solvers
from bdia.models import Prediction
from bdia.sampling import invert, sample
from bdia.state import State

__all__ = [
    "Prediction",
    "State",
    "exact",
    "gradients",
    "invert",
    "models",
    "sample",
    "schedules",
    "solvers",
]
__version__ = "0.1.0"
