"""Diagonal Fisher information of a model on a data set (docs/algorithms.md §2).

``diagonal_fisher`` is the only estimator the engine calls. Its default, ``per_sample``, is the
exact empirical Fisher F(D; w)[v] = (1/n)·Σ_i s_i[v]² (SDFC Eqs. 5–7, FDCR Eq. 5) from exact
per-sample gradients: by layer hooks for models made of Linear and Conv2d layers (SimpleCNN;
≈1.8–2× a training epoch, docs/performance.md §5), else by ``torch.func`` ``vmap(grad)``.
``official_label_mixed`` reproduces what both released codes compute (docs/algorithms.md §2.3); it is a
reproduction switch, never a speed option. ``per_sample_loop_fisher`` is the slow reference
(tests, and the benchmark's naive line); the tests' wrong mini-batch estimator is in
``tests/reference_fisher.py``. ``ESTIMATORS``, ``LABEL_SOURCES`` and ``IMPORTANCE_METRICS`` are
the catalogue of options every caller (the defenses' options included) checks against.

No function here changes the passed model's parameters or buffers: weights enter through
``torch.func.functional_call`` on copies, and the module's train/eval mode is restored on exit.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fisherguard.models import SimpleCNN, fold_input_channels, trainable, unfold_input_channels

Tensor = torch.Tensor

ESTIMATORS = ("per_sample", "official_label_mixed")
LABEL_SOURCES = ("dataset", "model_sample", "model_expectation")
IMPORTANCE_METRICS = ("squared", "abs")

__all__ = ["ESTIMATORS", "IMPORTANCE_METRICS", "LABEL_SOURCES", "diagonal_fisher",
           "per_sample_loop_fisher"]


def diagonal_fisher(model: nn.Module, weights: Tensor, x: Tensor, y: Tensor, *,
                    estimator: str = "per_sample", label_source: str = "dataset",
                    importance_metric: str = "squared", chunk_size: int = 128,
                    batch_size: int = 64, generator: torch.Generator | None = None,
                    backend: str = "auto") -> Tensor:
    """Diagonal Fisher (P,) float32 of ``model`` at flat ``weights`` on (x, y) (SDFC Eqs. 5–7, FDCR Eq. 5).

    ``x`` is (N, C, H, W), already transformed; ``y`` is (N,) int64. ``generator`` drives the
    ``model_sample`` labels and the ``official_label_mixed`` shuffle (the global RNG when None).
    ``backend`` picks how ``per_sample`` gets its exact per-sample gradients: ``hooks`` (layer
    inputs and output gradients, Linear and Conv2d only), ``vmap`` (``torch.func``, any model) or
    ``auto`` (hooks when every trainable parameter sits in a supported layer). Both are exact.
    """
    _check_options(estimator, label_source, importance_metric)
    if backend not in ("auto", "hooks", "vmap"):
        raise ValueError(f"backend must be 'auto', 'hooks' or 'vmap', got {backend!r}")
    if chunk_size < 1 or batch_size < 1:
        raise ValueError(f"chunk_size and batch_size must be >= 1, got {chunk_size}, {batch_size}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples, y has {y.shape[0]}")
    if estimator == "official_label_mixed":
        if label_source != "dataset":
            raise ValueError("official_label_mixed mixes the dataset labels; label_source must be 'dataset'")
        return _official_label_mixed(model, weights, x, y, importance_metric, batch_size, generator)
    folded = _fold_identical_channels(model, weights, x)
    if folded is not None:
        small, w1, x1 = folded
        f1 = diagonal_fisher(small, w1, x1, y, estimator=estimator, label_source=label_source,
                             importance_metric=importance_metric, chunk_size=chunk_size,
                             batch_size=batch_size, generator=generator, backend=backend)
        return unfold_input_channels(f1, int(x.shape[1]))
    if backend == "hooks" or (backend == "auto" and _hooks_supported(model)):
        if not _hooks_supported(model):
            raise ValueError("backend='hooks' needs every trainable parameter in an nn.Linear or a "
                             "groups=1 nn.Conv2d; use backend='vmap'")
        return _per_sample_hooks(model, weights, x, y, label_source, importance_metric,
                                 chunk_size, generator)
    return _per_sample_vmap(model, weights, x, y, label_source, importance_metric, chunk_size,
                            generator)


_FOLDED: dict[int, SimpleCNN] = {}


def _fold_identical_channels(model: nn.Module, weights: Tensor, x: Tensor
                             ) -> tuple[nn.Module, Tensor, Tensor] | None:
    """For a 3-channel SimpleCNN on inputs whose channels are all equal, the exact 1-channel twin.

    Every per-sample gradient of conv1's kernel is the same for each input channel, so the Fisher
    is computed on one channel and copied to the others; about a third less work per sample.
    """
    if type(model) is not SimpleCNN or model.conv1.in_channels == 1 or x.dim() != 4:
        return None
    if x.shape[1] != model.conv1.in_channels or not all(
            torch.equal(x[:, 0], x[:, c]) for c in range(1, x.shape[1])):
        return None
    if weights.dim() != 1 or weights.numel() != sum(p.numel() for p in trainable(model)):
        return None  # the full path raises the clear shape error
    classes = model.cls.out_features
    if classes not in _FOLDED:
        with torch.random.fork_rng():  # its initial weights are overwritten; keep the global RNG
            _FOLDED[classes] = SimpleCNN(1, classes)
    return _FOLDED[classes], fold_input_channels(weights.detach(), x.shape[1]), x[:, :1]


def _check_options(estimator: str, label_source: str, importance_metric: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if label_source not in LABEL_SOURCES:
        raise ValueError(f"label_source must be one of {LABEL_SOURCES}, got {label_source!r}")
    if importance_metric not in IMPORTANCE_METRICS:
        raise ValueError(f"importance_metric must be one of {IMPORTANCE_METRICS}, got {importance_metric!r}")


def _functional_state(model: nn.Module, weights: Tensor, requires_grad: bool = False
                      ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Trainable parameters from ``weights`` (NCHW-contiguous copies) and copies of the buffers.

    Copies, so that neither an autograd step nor a BatchNorm running-stat update in train mode can
    reach the caller's model.
    """
    params_t = trainable(model)
    total = sum(p.numel() for p in params_t)
    if weights.dim() != 1 or weights.numel() != total:
        raise ValueError(f"weights have shape {tuple(weights.shape)}, the model needs ({total},)")
    weights = weights.detach()
    params: dict[str, Tensor] = {}
    offset = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        n = p.numel()
        # contiguous NCHW: channels_last weights ran ≈10 % slower under functional_call (docs/performance.md §5)
        t = weights[offset:offset + n].to(dtype=p.dtype, device=p.device).reshape(p.shape).clone(
            memory_format=torch.contiguous_format)
        params[name] = t.requires_grad_(requires_grad)
        offset += n
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    return params, buffers


@contextlib.contextmanager
def _mode(model: nn.Module, train: bool) -> Iterator[None]:
    was = model.training
    model.train(train)
    try:
        yield
    finally:
        model.train(was)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _per_sample_vmap(model: nn.Module, weights: Tensor, x: Tensor, y: Tensor, label_source: str,
                     importance_metric: str, chunk_size: int,
                     generator: torch.Generator | None) -> Tensor:
    """Exact per-sample scores by ``vmap(grad)`` in chunks; squares (or |·|) summed then / n (docs/algorithms.md §2.2)."""
    params, buffers = _functional_state(model, weights)
    names = list(params)
    n = int(x.shape[0])
    acc = [torch.zeros_like(params[k], dtype=torch.float32) for k in names]
    if n == 0:
        return torch.cat([a.reshape(-1) for a in acc])

    def log_lik(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return torch.log_softmax(out, dim=-1)[0].gather(0, yi.reshape(1)).squeeze(0)

    per_sample_grads: Callable[..., dict[str, Tensor]] = vmap(grad(log_lik), in_dims=(None, 0, 0))
    reduce_: Callable[[Tensor], Tensor] = (
        (lambda g: g.square().sum(0)) if importance_metric == "squared" else (lambda g: g.abs().sum(0)))

    with _mode(model, False), torch.no_grad():
        for sl in _chunks(n, chunk_size):
            xc, yc = x[sl], y[sl].long()
            if label_source == "dataset":
                labels: list[tuple[Tensor, Tensor | None]] = [(yc, None)]
            else:
                with torch.no_grad():
                    prob = torch.softmax(functional_call(model, (params, buffers), (xc,)).float(), -1)
                if label_source == "model_sample":
                    labels = [(torch.multinomial(prob, 1, generator=generator).squeeze(1), None)]
                else:  # model_expectation: Σ_c p(c|x)·s_c², the exact model Fisher at C× the cost
                    labels = [(torch.full_like(yc, c), prob[:, c]) for c in range(prob.shape[1])]
            for lab, wgt in labels:
                with torch.enable_grad():
                    g = per_sample_grads(params, xc, lab)
                for a, k in zip(acc, names):
                    gk = g[k].float()
                    if wgt is None:
                        a += reduce_(gk)
                    else:
                        w = wgt.reshape((-1,) + (1,) * (gk.dim() - 1))
                        a += reduce_(gk * w) if importance_metric == "abs" else (w * gk.square()).sum(0)
    return torch.cat([a.reshape(-1) for a in acc]) / n


def _hooks_supported(model: nn.Module) -> bool:
    """True when every trainable parameter is the weight or bias of a Linear or groups=1 Conv2d."""
    covered: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1
                                          and mod.padding_mode == "zeros"
                                          and not isinstance(mod.padding, str)):
            covered.update(id(p) for p in mod.parameters(recurse=False) if p.requires_grad)
        elif any(p.requires_grad for p in mod.parameters(recurse=False)):
            return False
    return all(id(p) in covered for p in trainable(model))


def _per_sample_hooks(model: nn.Module, weights: Tensor, x: Tensor, y: Tensor, label_source: str,
                      importance_metric: str, chunk_size: int,
                      generator: torch.Generator | None) -> Tensor:
    """Exact per-sample squares from layer inputs a_i and output gradients g_i (docs/performance.md §5).

    A Linear sample's weight gradient is the outer product g_i a_iᵀ, so Σ_i (g_i a_iᵀ)² =
    (g²)ᵀ(a²) needs no per-sample tensor at all; a convolution's is g_i · unfold(a_i)ᵀ, formed per
    sample with one batched matmul. Eval mode keeps samples independent, so the gradient of
    Σ_i log p(y_i|x_i) at sample i's layer output is sample i's own.
    """
    # parameters require grad only so that every layer output joins the graph
    params, buffers = _functional_state(model, weights, requires_grad=True)
    name_of = {id(p): n for n, p in model.named_parameters()}
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
              and any(p.requires_grad for p in m.parameters(recurse=False))]
    acc = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in params.items()}
    n = int(x.shape[0])
    if n == 0:
        return torch.cat([a.reshape(-1) for a in acc.values()])
    squared = importance_metric == "squared"
    seen: list[tuple[nn.Module, Tensor, Tensor]] = []

    def hook(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        seen.append((mod, inp[0].detach(), out))

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with _mode(model, False):
            for sl in _chunks(n, chunk_size):
                xc, yc = x[sl], y[sl].long()
                if xc.dim() == 4:  # the convolutions and pools run ≈5 % faster on channels_last
                    xc = xc.contiguous(memory_format=torch.channels_last)
                seen.clear()
                with torch.enable_grad():
                    logp = torch.log_softmax(functional_call(model, (params, buffers), (xc,)), -1)
                if len(seen) != len(layers) or len({id(m) for m, _, _ in seen}) != len(layers):
                    raise RuntimeError("hooks backend needs each layer called exactly once per "
                                       "forward; use backend='vmap'")
                prob = logp.detach().exp()
                if label_source == "dataset":
                    targets = [(yc, None)]
                elif label_source == "model_sample":
                    targets = [(torch.multinomial(prob.float(), 1, generator=generator).squeeze(1), None)]
                else:
                    targets = [(torch.full_like(yc, c), prob[:, c]) for c in range(prob.shape[1])]
                outs = [o for _, _, o in seen]
                for j, (lab, wgt) in enumerate(targets):
                    total = logp.gather(1, lab.unsqueeze(1)).sum()
                    gouts = torch.autograd.grad(total, outs, retain_graph=j + 1 < len(targets))
                    for (mod, a, _), g in zip(seen, gouts):
                        _accumulate_layer(mod, a, g, wgt, squared, acc, name_of)
    finally:
        for h in handles:
            h.remove()
    return torch.cat([acc[k].reshape(-1) for k in params]) / n


def _per_sample_kernel_grads(mod: nn.Conv2d, a: Tensor, g: Tensor) -> Tensor:
    """Each sample's kernel gradient (N, O, C, kh, kw) of a groups=1 convolution from its input a_i
    and output gradient g_i: g_i · unfold(a_i)ᵀ.

    A one-channel input with stride 1 and no dilation (SimpleCNN's folded conv1) takes one grouped
    convolution instead, a sample a group with g_i as its kernels: ≈10 % off the whole client
    Fisher (docs/performance.md §8.2); unfolding a many-channel input costs the same as that.
    """
    nb, out_ch = g.shape[0], g.shape[1]
    c, (kh, kw) = a.shape[1], mod.kernel_size
    if c == 1 and mod.stride == (1, 1) and mod.dilation == (1, 1):
        ph, pw = mod.padding  # type: ignore[misc]
        inp = F.pad(a, (pw, pw, ph, ph)).reshape(1, nb, a.shape[2] + 2 * ph, a.shape[3] + 2 * pw)
        out = F.conv2d(inp, g.reshape(nb * out_ch, 1, *g.shape[2:]), groups=nb)  # (1, N·O, kh, kw)
        return out.view(nb, out_ch, 1, kh, kw)
    cols = F.unfold(a, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
    return torch.bmm(g.reshape(nb, out_ch, -1), cols.transpose(1, 2)).view(nb, out_ch, c, kh, kw)


def _accumulate_layer(mod: nn.Module, a: Tensor, g: Tensor, wgt: Tensor | None, squared: bool,
                      acc: dict[str, Tensor], name_of: dict[int, str]) -> None:
    """Add Σ_i w_i·s_i² (or w_i·|s_i|) of one layer's weight and bias to ``acc``."""
    f: Callable[[Tensor], Tensor] = torch.square if squared else torch.abs
    a, g = a.float(), g.float()
    if isinstance(mod, nn.Linear):
        a2, g2 = f(a.reshape(-1, a.shape[-1])), f(g.reshape(-1, g.shape[-1]))
        if a.dim() != 2:
            raise RuntimeError("hooks backend supports Linear layers on 2-D inputs only")
        if wgt is not None:
            g2 = g2 * wgt.float().unsqueeze(1)
        if mod.weight.requires_grad:
            acc[name_of[id(mod.weight)]] += g2.T @ a2
        if mod.bias is not None and mod.bias.requires_grad:
            acc[name_of[id(mod.bias)]] += g2.sum(0)
        return
    assert isinstance(mod, nn.Conv2d)
    nb, out_ch = g.shape[0], g.shape[1]
    gl = g.reshape(nb, out_ch, -1)
    if mod.weight.requires_grad:
        per = f(_per_sample_kernel_grads(mod, a, g).reshape(nb, out_ch, -1))  # (N, O, C·kh·kw)
        if wgt is not None:
            per = per * wgt.float().reshape(-1, 1, 1)
        acc[name_of[id(mod.weight)]] += per.sum(0).reshape(mod.weight.shape)
    if mod.bias is not None and mod.bias.requires_grad:
        gb = f(gl.sum(2))
        if wgt is not None:
            gb = gb * wgt.float().unsqueeze(1)
        acc[name_of[id(mod.bias)]] += gb.sum(0)


def _official_label_mixed(model: nn.Module, weights: Tensor, x: Tensor, y: Tensor,
                          importance_metric: str, batch_size: int,
                          generator: torch.Generator | None) -> Tensor:
    """The released ``fish_calculate`` (docs/algorithms.md §2.3): (mean over batches of ∇ mean_{i,j} log p(y_j|x_i))², train mode.

    Each sample is scored against the whole batch's label vector (defect 1) and the batch
    gradients are averaged before squaring (defect 2); shuffled, last partial batch dropped.
    """
    params, buffers = _functional_state(model, weights, requires_grad=True)
    names = list(params)
    n = int(x.shape[0])
    avg = [torch.zeros_like(params[k], dtype=torch.float32) for k in names]
    num_batches = n // batch_size
    if num_batches == 0:
        # the release divides 0 by 0 here; zeros make the server reject the upload as `constant`
        warnings.warn(f"official_label_mixed: {n} samples give no full batch of {batch_size}; "
                      "returning a zero Fisher", UserWarning, stacklevel=3)
        return torch.cat([a.reshape(-1) for a in avg])
    order = torch.randperm(n, generator=generator)
    with _mode(model, True):
        for b in range(num_batches):
            idx = order[b * batch_size:(b + 1) * batch_size]
            xb, yb = x[idx], y[idx].long()
            out = functional_call(model, (params, buffers), (xb,))
            obj = torch.log_softmax(out, dim=1)[:, yb].mean()  # B×B matrix L[i, y_j], as released
            grads = torch.autograd.grad(obj, [params[k] for k in names], allow_unused=True)
            for a, g in zip(avg, grads):
                if g is not None:
                    a += g.float()
    flat = torch.cat([a.reshape(-1) for a in avg]) / num_batches
    return flat.square() if importance_metric == "squared" else flat.abs()


def per_sample_loop_fisher(model: nn.Module, weights: Tensor, x: Tensor, y: Tensor, *,
                           importance_metric: str = "squared") -> Tensor:
    """Test reference: one backward pass per sample, dataset labels, eval mode (docs/algorithms.md §2.2; 7–22 epochs)."""
    _check_options("per_sample", "dataset", importance_metric)
    params, buffers = _functional_state(model, weights, requires_grad=True)
    names = list(params)
    acc = [torch.zeros_like(params[k], dtype=torch.float32) for k in names]
    n = int(x.shape[0])
    with _mode(model, False):
        for i in range(n):
            out = functional_call(model, (params, buffers), (x[i:i + 1],))
            ll = torch.log_softmax(out, dim=-1)[0, int(y[i])]
            grads = torch.autograd.grad(ll, [params[k] for k in names], allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a += g.float().square() if importance_metric == "squared" else g.float().abs()
    return torch.cat([a.reshape(-1) for a in acc]) / max(n, 1)
