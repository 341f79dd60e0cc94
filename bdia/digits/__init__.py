"""The digits application: a class-conditional diffusion model of 8x8 digits trained here, its classifier, the
metric built on it and the editing demo (``python -m bdia demo``).

``bdia.digits.model(guidance=None)`` is a ready ``bdia.models.Model`` (epsilon prediction, Stable Diffusion's
``scaled_linear`` ``DiscreteVP`` with T = 1000); ``classifier()``, ``heldout()`` (360 real digits never seen in
training), ``grid()`` for figures; ``bdia.digits.metrics`` scores samples (class accuracy and a Fréchet distance
in the classifier's features). ``import bdia`` does not load this package. See docs/digits.md.
"""

from bdia.digits.shipped import (
    CLASSIFIER_FILE,
    DATA_DIR,
    DENOISER_FILE,
    HELDOUT_FILE,
    NULL_CLASS,
    classifier,
    grid,
    heldout,
    model,
    net,
    schedule,
    split_indices,
    to_unit,
)

__all__ = [
    "CLASSIFIER_FILE",
    "DATA_DIR",
    "DENOISER_FILE",
    "HELDOUT_FILE",
    "NULL_CLASS",
    "classifier",
    "grid",
    "heldout",
    "model",
    "net",
    "schedule",
    "split_indices",
    "to_unit",
]
