"""Model adapters: whatever a network predicts, a denoiser returns one ``Prediction(x0, eps)``.

A *denoiser* is any object with a ``schedule`` attribute and ``__call__(x, t, **kwargs) -> Prediction``
where ``t`` is a python float in the schedule's native time. ``Model`` makes one from a network
``net(x, t_batch, **kwargs) -> Tensor``; ``GaussianMixture`` is an exact analytic one (docs/theory.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, NamedTuple, Protocol

import torch

from bdia._linalg import Coef, Terms, factored, factored2, lincomb
from bdia.schedules import Coefficients, Schedule

__all__ = ["CFG", "PREDICTIONS", "CountNFE", "Denoiser", "GaussianMixture", "Model", "Prediction", "Prepared"]


def fold(B: Coef, C: Coef, m: tuple[float, float, float, float]) -> tuple[Coef, Coef]:
    """The coefficients on ``u`` and ``v`` of ``B x0 + C eps`` when ``x0 = a u + b v``, ``eps = c u + d v``
    (``m = (a, b, c, d)``): numbers of the times alone, which a solver may memoise per grid point."""
    a, b, c, d = m
    return B * a + C * c, B * b + C * d


class Prediction:
    """The model's estimate of the clean data and of the noise at ``(x, t)``: ``x = alpha x0 + sigma eps``.

    Held as two tensors ``u, v`` and a 2x2 matrix ``m = (a, b, c, d)``: ``x0 = a u + b v``, ``eps = c u + d v``.
    ``Prediction(x0, eps)`` is the identity on the pair; ``Model`` makes ``Prediction.affine(x, out, m)`` from a
    network's output, which an affine integrator folds into its own update (``terms``: a BDIA-DDIM step then makes
    two passes over memory instead of five). ``pred.x0`` and ``pred.eps`` build the tensor on first use. Unpacks
    like a pair: ``x0, eps = pred``.
    """

    __slots__ = ("_eps", "_x0", "m", "u", "v")

    def __init__(self, x0: torch.Tensor, eps: torch.Tensor):
        for name, v in (("x0", x0), ("eps", eps)):
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"Prediction.{name} must be a tensor, got {type(v).__name__}")
        self.u, self.v, self.m, self._x0, self._eps = x0, eps, None, x0, eps

    @classmethod
    def affine(cls, u: torch.Tensor, v: torch.Tensor, m: tuple[float, float, float, float]) -> Prediction:
        """``x0 = a u + b v``, ``eps = c u + d v`` with ``m = (a, b, c, d)`` (float64 numbers)."""
        p = cls.__new__(cls)
        p.u, p.v, p.m, p._x0, p._eps = u, v, m, None, None
        return p

    def terms(self, B: Coef, C: Coef) -> Terms:
        """The terms of ``B x0 + C eps`` on ``u`` and ``v``, coefficients combined in float64 (no tensor touched)."""
        if self.m is None:
            return [(B, self.u), (C, self.v)]
        cu, cv = fold(B, C, self.m)
        return [(cu, self.u), (cv, self.v)]

    def factored(self, A: Coef, x: torch.Tensor, B: Coef, C: Coef) -> tuple[Coef, torch.Tensor]:
        """An affine step's ``A x + B x0 + C eps`` as ``(s, T)``, ``s T`` the sum (``bdia._linalg.factored``).
        A ``Model``'s prediction is in ``x`` itself and the network output: two tensors, one ``torch.add``."""
        if self.u is x and self.m is not None:
            cu, cv = fold(B, C, self.m)
            return factored2(A + cu, x, cv, self.v)
        return factored((A, x), *self.terms(B, C))

    @property
    def x0(self) -> torch.Tensor:
        if self._x0 is None:
            a, b, _, _ = self.m
            self._x0 = lincomb((a, self.u), (b, self.v))
        return self._x0

    @property
    def eps(self) -> torch.Tensor:
        if self._eps is None:
            _, _, c, d = self.m
            self._eps = lincomb((c, self.u), (d, self.v))
        return self._eps

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield self.x0
        yield self.eps

    def __repr__(self) -> str:
        return f"Prediction(x0={self.x0!r}, eps={self.eps!r})"


class Denoiser(Protocol):
    schedule: Schedule

    def __call__(self, x: torch.Tensor, t: float, **kwargs: Any) -> Prediction: ...


# A parametrisation maps (alpha, sigma, alpha', sigma') to the 2x2 matrix that turns (x, output) into
# (x0, eps): x0 = a x + b out, eps = c x + d out. Each is the closed form that is well conditioned for
# its output (no division by alpha for v or velocity; eps *is* the output for epsilon models).
Parametrisation = Callable[[Coefficients], tuple[float, float, float, float]]


def _epsilon(k: Coefficients) -> tuple[float, float, float, float]:
    return 1.0 / k.alpha, -k.sigma / k.alpha, 0.0, 1.0


def _sample(k: Coefficients) -> tuple[float, float, float, float]:
    return 0.0, 1.0, 1.0 / k.sigma, -k.alpha / k.sigma


def _v(k: Coefficients) -> tuple[float, float, float, float]:
    # v = alpha eps - sigma x0 (Salimans & Ho); the general inverse, which is alpha x - sigma v for VP
    n = k.alpha * k.alpha + k.sigma * k.sigma
    return k.alpha / n, -k.sigma / n, k.sigma / n, k.alpha / n


def _velocity(k: Coefficients) -> tuple[float, float, float, float]:
    # u = dx/dt = alpha' x0 + sigma' eps (rectified flow: u = eps - x0, then x0 = x - t u, eps = x + (1-t) u)
    det = k.alpha * k.dsigma - k.sigma * k.dalpha
    return k.dsigma / det, -k.sigma / det, -k.dalpha / det, k.alpha / det


PREDICTIONS: dict[str, Parametrisation] = {
    "epsilon": _epsilon,
    "sample": _sample,
    "v": _v,
    "velocity": _velocity,
}


def _safe(f: Parametrisation, k: Coefficients) -> tuple[float, float, float, float]:
    try:
        return f(k)
    except ZeroDivisionError:
        # e.g. an epsilon model at alpha = 0: x0 is undefined there; let it show as non-finite values
        return tuple(math.nan for _ in range(4))  # type: ignore[return-value]


class Prepared(NamedTuple):
    """What ``Model`` needs at one time for one kind of latent: the network's ``(batch,)`` time tensor (with its
    version, to see a network that edits it in place), the 2x2 matrix from ``(x, output)`` to ``(x0, eps)``, the time
    and the shape of the latents it serves (the network's output must have it)."""

    times: torch.Tensor
    version: int
    m: tuple[float, float, float, float]
    t: float
    shape: torch.Size


class Model:
    """Wrap a network ``net(x, t, **kwargs)`` into a denoiser.

    ``prediction``: ``"epsilon"``, ``"sample"`` (x0), ``"v"`` or ``"velocity"`` (the ODE velocity dx/dt,
    e.g. rectified flow's ``eps - x0``), or a callable mapping ``Coefficients`` to the 2x2 matrix above.
    ``net`` receives ``t`` as a tensor of shape ``(batch,)`` in the schedule's native time, of dtype
    ``time_dtype`` (default: the state's dtype, float32 for half precision states so that integer
    timesteps such as 981 stay exact).

    ``model(x, t)`` is ``model.predict(x, model.prepare(t, x))``: ``prepare`` builds what only the time and the
    latent's kind determine (the time tensor and the matrix), which a walk's plan builds once for its grid. A
    subclass that overrides ``__call__`` (to process the prediction) without overriding ``predict`` is called
    whole by every walk.
    """

    plannable: ClassVar[bool] = True  # __call__ is predict(x, prepare(t, x)): a walk's plan may call them apart

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "__call__" in cls.__dict__ and "predict" not in cls.__dict__:
            cls.plannable = False  # its own __call__ does more: a walk must call it as a denoiser
        if "predict" in cls.__dict__ and "output" not in cls.__dict__:
            cls.output = None  # type: ignore[assignment]  # its predict does more than wrap the output

    def __init__(
        self,
        net: Callable[..., torch.Tensor],
        schedule: Schedule,
        prediction: str | Parametrisation = "epsilon",
        *,
        time_dtype: torch.dtype | None = None,
    ):
        if not callable(net):
            raise TypeError(f"net must be callable as net(x, t, **kwargs), got {type(net).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a bdia.schedules.Schedule, got {type(schedule).__name__}")
        if isinstance(prediction, str):
            if prediction not in PREDICTIONS:
                raise ValueError(f"unknown prediction={prediction!r}; expected one of {sorted(PREDICTIONS)}")
            self._param = PREDICTIONS[prediction]
        elif callable(prediction):
            self._param = prediction
        else:
            raise TypeError(f"prediction must be a name in {sorted(PREDICTIONS)} or a callable")
        if time_dtype is not None and not isinstance(time_dtype, torch.dtype):
            raise TypeError(f"time_dtype must be a torch.dtype or None, got {time_dtype!r}")
        self.net, self.schedule, self.prediction, self.time_dtype = net, schedule, prediction, time_dtype

    def __call__(self, x: torch.Tensor, t: float, **kwargs: Any) -> Prediction:
        return self.predict(x, self.prepare(t, x), **kwargs)

    def prepare(self, t: float, like: torch.Tensor) -> Prepared:
        """The time tensor and the parametrisation's matrix at ``t`` for latents like ``like`` (batch, dtype,
        device)."""
        dtype = self.time_dtype or (like.dtype if like.dtype.itemsize >= 4 else torch.float32)
        if not dtype.is_floating_point and t != math.floor(t):
            # an integer time tensor would truncate it (a continuous schedule's time, or a stage between grid points)
            raise ValueError(f"time t={t} is not an integer, so it cannot be passed as time_dtype={dtype}")
        with torch.inference_mode(False):  # a normal tensor (with a version counter), usable in and out of that mode
            times = torch.full((like.shape[0],), t, dtype=dtype, device=like.device)
        return Prepared(times, times._version, _safe(self._param, self.schedule.at(t)), t, like.shape)

    def predict(self, x: torch.Tensor, ready: Prepared, **kwargs: Any) -> Prediction:
        """The network's prediction at ``x``, with what ``prepare`` made for its time and for latents like ``x``."""
        if x.shape != ready.shape:
            raise ValueError(f"x is shaped {tuple(x.shape)}, but ready was prepared for latents {tuple(ready.shape)}")
        return Prediction.affine(x, Model.output(self, x, ready, kwargs), ready.m)

    def output(self, x: torch.Tensor, ready: Prepared, kwargs: dict[str, Any]) -> torch.Tensor:
        """The network's checked output at ``x``, a latent of the shape ``ready`` was prepared for (``predict``
        without the ``Prediction``: what a plan's gamma = 1 step combines directly)."""
        if ready.times._version != ready.version:  # the network edited its time tensor in place: build a fresh one
            ready = self.prepare(ready.t, x)
        # (a walk calls this once a step: the checks are written for speed; dtypes are singletons)
        out = self.net(x, ready.times, **kwargs) if kwargs else self.net(x, ready.times)
        if not isinstance(out, torch.Tensor) or out.shape != ready.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"net output must be a tensor shaped like x {tuple(x.shape)}, got {got}")
        if out.dtype is not x.dtype:
            raise TypeError(f"net output dtype {out.dtype} differs from the state's {x.dtype}")
        return out

    def __repr__(self) -> str:
        return f"Model({getattr(self.net, '__name__', type(self.net).__name__)}, {self.schedule}, {self.prediction!r})"


class CountNFE:
    """Wrap a denoiser and count its evaluations in ``calls`` (the number of function evaluations, NFE)."""

    def __init__(self, model: Denoiser):
        self.model, self.schedule, self.calls = model, model.schedule, 0

    def __call__(self, x: torch.Tensor, t: float, **kwargs: Any) -> Prediction:
        self.calls += 1
        return self.model(x, t, **kwargs)


class CFG:
    """Classifier-free guidance (Ho & Salimans 2022) on a network's output, in one batched call.

    ``CFG(net, scale, **uncond)`` is itself a network: called with conditioning ``**cond`` it runs
    ``net(cat[x, x], cat[t, t], **cat[uncond, cond])`` once and returns ``u + scale (c - u)``.
    Every conditioning keyword must have an unconditional counterpart; tensors of batch 1 are
    broadcast to the batch. Guidance acts on the output before any step, so it preserves exact inversion.
    """

    def __init__(self, net: Callable[..., torch.Tensor], scale: float | torch.Tensor, **uncond: Any):
        if not callable(net):
            raise TypeError("net must be callable")
        if isinstance(scale, torch.Tensor):
            if scale.dim() != 1 or not scale.is_floating_point() or not bool(torch.isfinite(scale).all()):
                raise ValueError(
                    f"scale must be a finite number or a 1-D floating tensor of finite values (one per sample), got "
                    f"{scale.dtype} of shape {tuple(scale.shape)}"
                )
            scale = scale.detach().clone()
        elif isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number (or a 1-D tensor, one per sample), got {scale!r}")
        else:
            scale = float(scale)
        self.net, self.scale, self.uncond = net, scale, uncond

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        if set(cond) != set(self.uncond):
            raise ValueError(
                f"CFG needs the same conditioning keywords as its unconditional ones: got {sorted(cond)}, "
                f"unconditional {sorted(self.uncond)}"
            )
        B = x.shape[0]
        kw = {k: _cat_batch(k, self.uncond[k], cond[k], B) for k in cond}
        u, c = self.net(torch.cat([x, x]), torch.cat([t, t]), **kw).chunk(2)
        s = self.scale
        if isinstance(s, torch.Tensor):
            if s.shape[0] != B:
                raise ValueError(f"CFG scale has {s.shape[0]} entries but the batch has {B} samples")
            s = s.to(x.device, x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return lincomb((1.0, u), (s, c), (-s, u))


def _cat_batch(name: str, u: Any, c: Any, B: int) -> Any:
    """The unconditional and conditional values of one keyword batched as ``[u; c]``: tensors are concatenated
    along the batch (a batch of 1 is broadcast), dicts and lists/tuples entry by entry (SDXL's
    ``added_cond_kwargs``), and anything else must be equal on both sides (it cannot be batched)."""
    if isinstance(c, dict) or isinstance(u, dict):
        if not (isinstance(c, dict) and isinstance(u, dict)) or set(c) != set(u):
            raise ValueError(
                f"conditioning {name!r} is a dict: its unconditional counterpart must be a dict with the same keys, "
                f"got {sorted(u) if isinstance(u, dict) else type(u).__name__} and "
                f"{sorted(c) if isinstance(c, dict) else type(c).__name__}"
            )
        return {k: _cat_batch(f"{name}[{k!r}]", u[k], c[k], B) for k in c}
    if isinstance(c, list | tuple) or isinstance(u, list | tuple):
        if type(c) is not type(u) or len(c) != len(u):
            raise ValueError(
                f"conditioning {name!r} and its unconditional counterpart must be {type(c).__name__}s of one length"
            )
        return type(c)(_cat_batch(f"{name}[{i}]", a, b, B) for i, (a, b) in enumerate(zip(u, c, strict=True)))
    if not isinstance(c, torch.Tensor) and not isinstance(u, torch.Tensor):
        if c is not u and c != u:
            raise ValueError(f"non-tensor conditioning {name!r} must equal its unconditional value")
        return c
    if not (isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor)):
        raise TypeError(f"conditioning {name!r} is a tensor on one side only (unconditional and conditional)")

    def fit(v: torch.Tensor, what: str) -> torch.Tensor:
        if v.dim() == 0:
            raise ValueError(f"{what} conditioning {name!r} is a 0-d tensor; it needs a batch dimension")
        if v.shape[0] == B:
            return v
        if v.shape[0] == 1:
            return v.expand(B, *v.shape[1:])
        raise ValueError(f"{what} conditioning {name!r} has batch {v.shape[0]}, expected 1 or {B}")

    return torch.cat([fit(u.to(c.device), "unconditional"), fit(c, "conditional")])


class GaussianMixture:
    """Exact denoiser for data ``sum_k w_k N(mu_k, s_k^2 I)`` under any schedule (docs/theory.md).

    The noised marginal is ``sum_k w_k N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I)``, so ``x0_hat`` and
    ``eps_hat`` (posterior means) are closed-form: a softmax over components, computed in float64 and
    returned in the state's dtype. The optional keyword ``labels`` (LongTensor of shape ``(batch,)``)
    conditions on a component; label ``-1`` means unconditional.
    """

    def __init__(
        self,
        schedule: Schedule,
        means: torch.Tensor,
        stds: float | torch.Tensor = 0.1,
        weights: torch.Tensor | None = None,
    ):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a bdia.schedules.Schedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.dim() != 2:
            raise ValueError(f"means must be (components, dim), got shape {tuple(self.means.shape)}")
        if not bool(torch.isfinite(self.means).all()):
            raise ValueError("means must be finite")
        K = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(K).clone()
        if not bool(((self.stds > 0) & torch.isfinite(self.stds)).all()):
            raise ValueError("stds must be finite and > 0")
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()
        if w.shape != (K,) or not bool(((w > 0) & torch.isfinite(w)).all()):
            raise ValueError(f"weights must be {K} positive numbers")
        self.weights = w / w.sum()

    @classmethod
    def random(
        cls, schedule: Schedule, dim: int = 2, components: int = 4, std: float = 0.3, seed: int = 0
    ) -> GaussianMixture:
        """A reproducible mixture whose means lie on the sphere of radius sqrt(dim) (data of unit scale)."""
        g = torch.Generator().manual_seed(seed)
        mu = torch.randn(components, dim, generator=g, dtype=torch.float64)
        mu = mu / mu.norm(dim=1, keepdim=True) * math.sqrt(dim) * (1 - std**2) ** 0.5
        w = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
        return cls(schedule, mu, std, w)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(
        self, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``n`` exact draws from the data distribution, float64, shape ``(n, dim)``."""
        if labels is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            labels = self._labels(labels, n, allow_unconditional=False)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[labels] + self.stds[labels, None] * z

    def __call__(self, x: torch.Tensor, t: float, labels: torch.Tensor | None = None) -> Prediction:
        k = self.schedule.at(t)
        B = x.shape[0]
        if math.prod(x.shape[1:]) != self.dim:
            raise ValueError(f"x has {math.prod(x.shape[1:])} elements per sample, the mixture has dim {self.dim}")
        xf = x.reshape(B, self.dim).to(torch.float64)
        mu, s2, w = self._on(xf.device)
        v = k.alpha**2 * s2 + k.sigma**2  # (K,)
        diff = xf[:, None, :] - k.alpha * mu[None]  # (B, K, D)
        logits = w.log() - 0.5 * diff.pow(2).sum(-1) / v - 0.5 * self.dim * v.log()
        if labels is not None:
            labels = self._labels(labels, B, allow_unconditional=True).to(xf.device)
            keep = (labels[:, None] < 0) | (labels[:, None] == torch.arange(len(v), device=xf.device))
            logits = logits.masked_fill(~keep, -math.inf)
        r = torch.softmax(logits, dim=1)[..., None]  # (B, K, 1)
        x0 = (r * (mu[None] + (k.alpha * s2 / v)[None, :, None] * diff)).sum(1)
        eps = (r * ((k.sigma / v)[None, :, None] * diff)).sum(1)
        return Prediction(x0.reshape(x.shape).to(x.dtype), eps.reshape(x.shape).to(x.dtype))

    def _labels(self, labels: object, n: int, allow_unconditional: bool) -> torch.Tensor:
        """``labels`` checked: an integer tensor of shape ``(n,)`` with components in range (-1: unconditional)."""
        K = self.means.shape[0]
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor of shape ({n},), got {type(labels).__name__}")
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), one per sample, got {tuple(labels.shape)}")
        lo = -1 if allow_unconditional else 0
        if labels.numel() and not bool(((labels >= lo) & (labels < K)).all()):
            raise ValueError(
                f"labels must lie in [{lo}, {K - 1}] (a component of the mixture"
                f"{', or -1 for unconditional' if allow_unconditional else ''}), got {labels.tolist()}"
            )
        return labels

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # the parameters copied once per device, so that evaluations on a GPU make no host-to-device copies
        cache = self.__dict__.setdefault("_per_device", {})
        if device not in cache:
            cache[device] = (self.means.to(device), self.stds.to(device) ** 2, self.weights.to(device))
        return cache[device]

    def __repr__(self) -> str:
        return f"GaussianMixture(components={self.means.shape[0]}, dim={self.dim}, {self.schedule})"
