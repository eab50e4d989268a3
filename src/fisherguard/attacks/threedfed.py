"""3DFed (Li et al., IEEE S&P 2023): loss, noise mask, decoys, indicators (docs/attacks.md §3.10).

Implemented: (1) backdoor training with a·L_backdoor + b·(1 − cos(w, w^t)); (2) the noise-mask
step on the upload; (3, simplified) decoy models: k of the attackers' uploads are replaced by
clean-trained models with one final-layer coordinate pushed ``decoy_threshold`` away from the
benign reference, to attract outlier/cluster detection; (4, simplified) indicator coordinates
planted in the uploads whose value in the next global model tells whether the backdoor uploads
and each decoy were accepted, and feedback rules: the noise weight α rises after a rejection and
falls back after an acceptance, and the decoy count follows the authors' tuning rule.
Not implemented: tuning the update scaling.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fisherguard.attacks.base import (Attack, AttackConfigError, RoundView, check_state_keys,
                                      state_tensor)
from fisherguard.attacks.pixel import (BadNetsPixelPoison, PixelPatch, check,
                                       check_poison_options, clean_pixels, minibatches,
                                       to_normalised)
from fisherguard.clients.modifier import TrainingModifier
from fisherguard.clients.plan import TrainPlan
from fisherguard.clients.training import Upload
from fisherguard.models import flatten, load_flat, trainable
from fisherguard.seeding import torch_stream

Tensor = torch.Tensor


def constrained_loss(backdoor: Tensor, params: Sequence[Tensor], global_flat: Tensor, *,
                     a: float, b: float) -> Tensor:
    """a·L_backdoor + b·(1 − cos(w, w^t)), differentiable in the parameters."""
    w = torch.cat([p.reshape(-1) for p in params])
    cos = F.cosine_similarity(w, global_flat.to(w.dtype), dim=0)
    return a * backdoor + b * (1.0 - cos)


class ConstrainedLoss(TrainingModifier):
    """3DFed's training loss: the poisoned-data loss traded against cosine distance to w^t."""

    name = "3dfed-loss"

    def __init__(self, a: float, b: float) -> None:
        self.a, self.b = a, b

    def begin(self, model: nn.Module, params: Sequence[Tensor], start_weights: Tensor) -> None:
        self.global_flat = start_weights.detach().clone()

    def loss(self, loss: Tensor, ce: Tensor, model: nn.Module, params: Sequence[Tensor],
             x: Tensor, y: Tensor) -> Tensor:
        return constrained_loss(loss, params, self.global_flat, a=self.a, b=self.b)


def noise_mask(delta: Tensor, reference: Tensor, *, fraction: float, alpha: float, steps: int,
               lr: float) -> Tensor:
    """Noise n on the ``fraction`` of coordinates with the smallest |Δ| (low importance), found by
    Adam on 1 − cos(Δ + n, reference) with ‖n‖₂ ≤ α·‖Δ‖₂ after every step; returns n."""
    k = int(round(fraction * delta.numel()))
    n = torch.zeros_like(delta)
    bound = alpha * float(delta.norm())
    if k == 0 or steps == 0 or bound == 0.0 or float(reference.norm()) == 0.0:
        return n
    mask = torch.zeros_like(delta)
    mask[torch.topk(delta.abs(), k, largest=False).indices] = 1.0
    v = torch.zeros_like(delta, requires_grad=True)
    opt = torch.optim.Adam([v], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = 1.0 - F.cosine_similarity(delta + v * mask, reference, dim=0)
        loss.backward()
        opt.step()
        with torch.no_grad():
            norm = float((v * mask).norm())
            if norm > bound:
                v.mul_(bound / norm)
    return (v * mask).detach()


# the decoy's coordinate lands just past the threshold, as the authors' param loss leaves it
DECOY_MARGIN = 0.01


def final_layer_span(model: nn.Module) -> tuple[int, int]:
    """[start, end) of the last ``nn.Linear`` weight in the flat vector (3DFed's decoy layer)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    params = trainable(model)
    if not linears or not any(p is linears[-1].weight for p in params):
        n = sum(p.numel() for p in params)
        return 0, n  # no trainable classifier: any coordinate may carry the decoy
    offset = 0
    for p in params:
        if p is linears[-1].weight:
            return offset, offset + p.numel()
        offset += p.numel()
    raise AssertionError("unreachable")


def clean_trained(model: nn.Module, start: Tensor, x_pix: Tensor, y: Tensor, pipeline: Any, *,
                  epochs: int, batch_size: int, lr: float, momentum: float,
                  generator: torch.Generator) -> Tensor:
    """w^t trained on clean data with plain cross-entropy (3DFed's decoy keeps main accuracy)."""
    load_flat(model, start)
    model.train()
    params = trainable(model)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    for _ in range(epochs):
        for b in minibatches(len(y), batch_size, generator):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(to_normalised(x_pix[b], pipeline)), y[b]).backward()
            opt.step()
    return flatten(model).detach().clone()


class ThreeDFed(BadNetsPixelPoison, Attack):
    """3DFed, Li et al. IEEE S&P 2023: loss, noise, decoys, indicators (docs/attacks.md §3.10)."""

    name = "3dfed"
    paper = "Li, Ye, Hu, Li, Wang, Fang, Shi, IEEE S&P 2023"
    summary = ("adaptive backdoor: cosine-constrained training loss, optimised noise mask, "
               "decoy models, indicator feedback adapting the noise weight and decoy count")
    kind = "model poisoning"
    knowledge = "colluding"  # the attackers plant the same indicators from their joint updates
    per_client = True

    def __init__(self, *, target: int = 2, poison_prob: float = 0.5, channels: int = 3,
                 family: str = "fdcr", a: float = 0.6, b: float = 0.4, noise_steps: int = 20,
                 noise_lr: float = 0.01, noise_alpha: float = 0.1,
                 noise_fraction: float = 0.5, indicators: int = 5, indicator_shift: float = 5.0,
                 alpha_step: float = 0.1, alpha_max: float = 1.0,
                 decoys: int | str = "adaptive", decoy_epochs: int = 1,
                 decoy_threshold: float = 10.0) -> None:
        check_poison_options("3dfed", target, poison_prob)
        check(lambda: channels in (1, 3), "3dfed", "channels", "1 or 3", channels)
        check(lambda: family in ("fdcr", "sdfc"), "3dfed", "family", "'fdcr' or 'sdfc'", family)
        check(lambda: a >= 0, "3dfed", "a", "≥ 0", a)
        check(lambda: b >= 0, "3dfed", "b", "≥ 0", b)
        check(lambda: a + b > 0, "3dfed", "a", "such that a + b > 0", (a, b))
        check(lambda: isinstance(noise_steps, int) and noise_steps >= 0, "3dfed", "noise_steps",
              "an int ≥ 0 (the compute budget: noise-mask steps per upload and round)",
              noise_steps)
        check(lambda: noise_lr > 0, "3dfed", "noise_lr", "> 0", noise_lr)
        check(lambda: noise_alpha >= 0, "3dfed", "noise_alpha", "≥ 0", noise_alpha)
        check(lambda: 0.0 <= noise_fraction <= 1.0, "3dfed", "noise_fraction", "in [0, 1]",
              noise_fraction)
        check(lambda: isinstance(indicators, int) and indicators >= 0, "3dfed", "indicators",
              "an int ≥ 0 (0: no indicator feedback)", indicators)
        check(lambda: indicator_shift > 0, "3dfed", "indicator_shift", "> 0", indicator_shift)
        check(lambda: alpha_step >= 0, "3dfed", "alpha_step", "≥ 0", alpha_step)
        check(lambda: alpha_max >= noise_alpha, "3dfed", "alpha_max", "≥ noise_alpha", alpha_max)
        check(lambda: decoys == "adaptive" if isinstance(decoys, str) else
              isinstance(decoys, int) and not isinstance(decoys, bool) and decoys >= 0,
              "3dfed", "decoys", "an int ≥ 0 (a fixed count) or 'adaptive'", decoys)
        check(lambda: isinstance(decoy_epochs, int) and not isinstance(decoy_epochs, bool)
              and decoy_epochs >= 0, "3dfed", "decoy_epochs",
              "an int ≥ 0 (the compute budget: clean epochs per decoy and round)", decoy_epochs)
        check(lambda: decoy_threshold > 0, "3dfed", "decoy_threshold", "> 0", decoy_threshold)
        self.decoys, self.decoy_epochs, self.decoy_threshold = (decoys, decoy_epochs,
                                                                decoy_threshold)
        # the decoy count in force: adaptive starts at 0 (the authors' initial value)
        self.decoy_count = 0 if decoys == "adaptive" else int(decoys)
        self._decoy_slots: list[int] = []  # the client ids that uploaded decoys last round
        self._decoy_planted: tuple[Tensor, Tensor] | None = None  # their indicators, one each
        self.last_decoys: dict[int, dict[str, float]] = {}  # this round's decoys, for inspection
        self.indicators, self.indicator_shift = indicators, indicator_shift
        self.alpha_step, self.alpha_max = alpha_step, alpha_max
        self.alpha = noise_alpha  # the noise weight in force, adapted by the indicator feedback
        self._planted: tuple[Tensor, Tensor] | None = None  # (indices, shift) of the last round
        self.feedback: list[dict[str, float]] = []
        self.target, self.poison_prob, self.channels, self.family = (target, poison_prob,
                                                                     channels, family)
        self.a, self.b = a, b
        self.noise_steps, self.noise_lr = noise_steps, noise_lr
        self.noise_alpha, self.noise_fraction = noise_alpha, noise_fraction
        self.trigger: PixelPatch | None = None
        self._prev_global: Tensor | None = None
        self.last_noise_norm: dict[int, float] = {}

    def training(self, client_id: int, round_idx: int,
                 start_weights: torch.Tensor) -> TrainingModifier | None:
        return ConstrainedLoss(self.a, self.b)

    def after_training(self, view: RoundView) -> dict[int, Upload]:
        """Read the indicators (adapt α and k), turn k uploads into decoys, add the noise mask to
        the backdoor uploads, plant new indicators."""
        g = view.global_weights.detach()
        reference = None if self._prev_global is None else g - self._prev_global
        if reference is not None and self._planted is not None:
            self.read_indicators(reference)
        self._prev_global = g.clone()
        self.last_noise_norm, self.last_decoys = {}, {}
        own = {cid: u for cid, u in view.own.items()
               if isinstance(u.weights, torch.Tensor) and u.weights.shape == g.shape}
        # decoys take the last k attacker slots (the authors use the last client slots); at
        # least one upload stays a backdoor
        k = min(self.decoy_count, max(len(own) - 1, 0))
        slots = sorted(own)[len(own) - k:] if k else []
        backdoor = {cid: u for cid, u in own.items() if cid not in slots}
        for cid, u in backdoor.items():
            if reference is None:  # the first attack round has no earlier global model
                break
            delta = u.weights.detach() - g
            n = noise_mask(delta, reference, fraction=self.noise_fraction, alpha=self.alpha,
                           steps=self.noise_steps, lr=self.noise_lr)
            u.weights = g + delta + n
            self.last_noise_norm[cid] = float(n.norm())
        if slots:
            mean_bd = torch.stack([u.weights.detach() - g for u in backdoor.values()]).mean(0)
            taken: list[int] = []
            for j, cid in enumerate(slots):
                own[cid].weights = self.make_decoy(cid, j, view.round_idx, g, own[cid], mean_bd,
                                                   taken)
        self._decoy_slots = list(slots)
        if self.indicators > 0 and own:
            self.plant(g, own, slots)
        else:  # no indicators: nothing to read back, the decoy count stays where it is
            self._planted = self._decoy_planted = None
        return view.own

    def make_decoy(self, cid: int, j: int, round_idx: int, g: Tensor, upload: Upload,
                   mean_backdoor: Tensor, taken: list[int]) -> Tensor:
        """3DFed's decoy (docs/attacks.md §3.10, part 3): a clean model, one final-layer coordinate
        pushed ``decoy_threshold`` away from the benign reference.

        The benign reference is the decoy's own clean update (``decoy_epochs`` of plain
        cross-entropy from w^t on the attacker's clean data, the federation's lr/momentum/batch
        size). The coordinate is the one where |mean backdoor update − benign update| is smallest,
        one distinct coordinate per decoy (``taken``). Instead of the authors' loss term
        −10·|θ − benign| (zero past the threshold) the coordinate is set to its fixed point,
        benign ± threshold·(1 + margin), in the direction of the benign update. Without clean
        images or a model factory (toy contexts) the reference is the attacker's own update and
        any coordinate may be chosen.
        """
        ctx = getattr(self, "ctx", None)
        benign, span = upload.weights.detach().clone(), (0, g.numel())
        if ctx is not None and ctx.model_factory is not None:
            data = ctx.clean_data
            data = {cid: data[cid]} if cid in data else data
            try:
                x_pix, y, pipeline = clean_pixels(data)
            except AttackConfigError:
                x_pix = None  # no clean images: keep the attacker's own update
            model = ctx.model_factory()
            if x_pix is not None and sum(p.numel() for p in trainable(model)) == g.numel():
                plan = ctx.plan if ctx.plan is not None else TrainPlan()
                benign = clean_trained(model, g, x_pix, y, pipeline, epochs=self.decoy_epochs,
                                       batch_size=plan.batch_size, lr=plan.lr,
                                       momentum=plan.momentum,
                                       generator=torch_stream(ctx.seed, "3dfed-decoy",
                                                              round_idx, j))
                span = final_layer_span(model)
        benign_delta = benign - g
        gap = (mean_backdoor - benign_delta).abs()
        gap[taken] = float("inf")  # one distinct coordinate per decoy
        idx = span[0] + int(torch.argmin(gap[span[0]:span[1]]))
        taken.append(idx)
        sign = 1.0 if float(benign_delta[idx]) >= 0 else -1.0
        decoy = benign.clone()
        decoy[idx] = benign[idx] + sign * self.decoy_threshold * (1.0 + DECOY_MARGIN)
        self.last_decoys[cid] = {"coordinate": float(idx), "benign": float(benign[idx]),
                                 "value": float(decoy[idx])}
        return decoy

    def plant(self, g: Tensor, own: dict[int, Upload], slots: Sequence[int] = ()) -> None:
        """Set the ``indicators`` coordinates the attackers' updates change least to w^t + c in
        every backdoor upload, and one more such coordinate per decoy in that decoy only.

        c = ``indicator_shift`` · mean |Δ| over the attackers' updates. Each indicator is left at
        w^t (a zero update) in the uploads that do not carry it, so that its move in the next
        global model is its carrier's alone; decoys' pushed coordinates are never indicators.
        """
        deltas = torch.stack([u.weights.detach() - g for u in own.values()])
        mean_abs = deltas.abs().mean(0)
        shift = self.indicator_shift * float(mean_abs.mean())
        order = mean_abs.clone()
        pushed = [int(d["coordinate"]) for d in self.last_decoys.values()]
        order[pushed] = float("inf")
        k = min(self.indicators + len(slots), g.numel() - len(pushed))
        chosen = torch.topk(order, k, largest=False).indices
        idx, decoy_idx = chosen[:self.indicators], chosen[self.indicators:]
        for cid, u in own.items():
            w = u.weights.detach().clone()
            w[chosen] = g[chosen]
            if cid in slots:
                j = list(slots).index(cid)
                if j < len(decoy_idx):
                    w[decoy_idx[j]] = g[decoy_idx[j]] + shift
            else:
                w[idx] = g[idx] + shift
            u.weights = w
        self._planted = (idx, torch.tensor(shift))
        self._decoy_planted = ((decoy_idx, torch.full((len(decoy_idx),), shift))
                               if len(slots) else None)

    def read_indicators(self, update: Tensor) -> None:
        """ρ = mean over indicators of (w^{t+1} − w^t)/c; accepted when ρ ≥ half the backdoor
        uploads' count share. Per decoy, ρ_j ≥ half of 1/K means that decoy was accepted.

        Under FedAvg an accepted round moves the indicators by about the carriers' weight share
        times c, a rejected one by the benign drift of low-importance coordinates (≈ 0). After a
        rejection α grows by ``alpha_step`` (up to ``alpha_max``); after an acceptance it shrinks
        by the same step, not below ``noise_alpha``. With ``decoys: adaptive`` the count follows
        the authors' rule: k ← max(k − accepted decoys, 0), then k + 1 when neither the backdoor
        nor any decoy was accepted, clipped to [0, attackers − 1].
        """
        assert self._planted is not None
        idx, shift = self._planted
        rho = float((update[idx] / shift).mean()) if float(shift) != 0.0 else 0.0
        ctx = getattr(self, "ctx", None)
        carriers = len(ctx.attackers) - len(self._decoy_slots) if ctx is not None else 0
        share = carriers / max(ctx.num_clients, 1) if ctx is not None else 0.0
        accepted = rho >= 0.5 * share
        if accepted:
            self.alpha = max(self.noise_alpha, self.alpha - self.alpha_step)
        else:
            self.alpha = min(self.alpha_max, self.alpha + self.alpha_step)
        decoy_accepted = 0
        if self._decoy_planted is not None and ctx is not None:
            d_idx, d_shift = self._decoy_planted
            ok = d_shift != 0
            rho_j = torch.where(ok, update[d_idx] / torch.where(ok, d_shift, 1.0), 0.0)
            decoy_accepted = int((rho_j >= 0.5 / max(ctx.num_clients, 1)).sum())
        if self.decoys == "adaptive":
            k = max(self.decoy_count - decoy_accepted, 0)
            if not accepted and decoy_accepted == 0:
                k += 1
            most = len(ctx.attackers) - 1 if ctx is not None else k
            self.decoy_count = min(max(k, 0), max(most, 0))
        self.feedback.append({"rho": rho, "accepted": float(accepted), "alpha": self.alpha,
                              "decoys": float(len(self._decoy_slots)),
                              "decoy_accepted": float(decoy_accepted),
                              "decoy_count": float(self.decoy_count)})

    STATE = ("prev_global", "alpha", "planted_idx", "planted_shift", "feedback", "decoy_count",
             "decoy_slots", "decoy_idx", "decoy_shift")

    def state_dict(self) -> dict[str, Any]:
        """What the next round reads: w^{t−1} (the previous global model, for the reference
        update), the noise weight α in force, the planted indicators (indices, shift) to read
        back, the feedback log, the decoy count k in force, last round's decoy slots and their
        indicators (indices, shifts). The trigger is fixed at bind, ``last_noise_norm`` and
        ``last_decoys`` are reset every round."""
        planted, decoy = self._planted, self._decoy_planted
        return {"prev_global": None if self._prev_global is None else self._prev_global.clone(),
                "alpha": float(self.alpha),
                "planted_idx": None if planted is None else planted[0].clone(),
                "planted_shift": None if planted is None else planted[1].clone(),
                "feedback": [dict(f) for f in self.feedback],
                "decoy_count": int(self.decoy_count),
                "decoy_slots": list(self._decoy_slots),
                "decoy_idx": None if decoy is None else decoy[0].clone(),
                "decoy_shift": None if decoy is None else decoy[1].clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        name = self.name
        check_state_keys(name, state, self.STATE)
        prev = state["prev_global"]
        if prev is not None:
            prev = state_tensor(name, "prev_global", prev)
            if prev.dim() != 1:
                raise ValueError(f"attack {name!r}: state 'prev_global' must be a flat model, "
                                 f"got shape {tuple(prev.shape)}")
        alpha = state["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise ValueError(f"attack {name!r}: state 'alpha' must be a number, got {alpha!r}")
        planted = _indicator_pair(name, state, "planted", lambda idx: ())
        feedback = state["feedback"]
        if not isinstance(feedback, list) or not all(isinstance(f, dict) for f in feedback):
            raise ValueError(f"attack {name!r}: state 'feedback' must be a list of dicts")
        count, slots = state["decoy_count"], state["decoy_slots"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"attack {name!r}: state 'decoy_count' must be an int ≥ 0, "
                             f"got {count!r}")
        if not isinstance(slots, list) or not all(isinstance(c, int) and not isinstance(c, bool)
                                                  for c in slots):
            raise ValueError(f"attack {name!r}: state 'decoy_slots' must be a list of client ids")
        decoy = _indicator_pair(name, state, "decoy", lambda idx: tuple(idx.shape))
        if decoy is not None and len(decoy[0]) > len(slots):
            raise ValueError(f"attack {name!r}: state 'decoy_idx' holds more indices than decoy "
                             "slots")
        self._prev_global, self.alpha, self._planted = prev, float(alpha), planted
        self.feedback = [dict(f) for f in feedback]
        self.decoy_count, self._decoy_slots, self._decoy_planted = count, list(slots), decoy


def _indicator_pair(name: str, state: dict[str, Any], prefix: str,
                    shift_shape: Callable[[Tensor], tuple[int, ...]]
                    ) -> tuple[Tensor, Tensor] | None:
    """The saved (``<prefix>_idx``, ``<prefix>_shift``) of planted indicators: both None, or a
    1-D long index tensor and its shift of ``shift_shape(idx)``."""
    idx, shift = state[f"{prefix}_idx"], state[f"{prefix}_shift"]
    if (idx is None) != (shift is None):
        raise ValueError(f"attack {name!r}: {prefix}_idx and {prefix}_shift go together")
    if idx is None:
        return None
    idx = state_tensor(name, f"{prefix}_idx", idx)
    if idx.dim() != 1 or idx.dtype != torch.long:
        raise ValueError(f"attack {name!r}: state '{prefix}_idx' must be a 1-D long tensor")
    return idx, state_tensor(name, f"{prefix}_shift", shift, shift_shape(idx))
