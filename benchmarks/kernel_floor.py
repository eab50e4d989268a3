#!/usr/bin/env python
"""How fast can the paper run be at all? A floor for issue target 3 from the convolution kernels.

    python benchmarks/kernel_floor.py            # `make bench-floor`; part of `make bench`

The fast engine trains a round's clients as one grouped convolution (docs/performance.md §3). Every
SGD step must run five convolution kernels: conv1 forward and weight gradient (conv1 needs no
input gradient), conv2 forward, input gradient and weight gradient. This script times each kernel
alone at the engine's exact shapes (batch 64 per client, groups of G clients, channels_last,
conv1 folded to one channel as on grey data), one thread per process as in the engine's workers,
and for each kernel also the other formulations PyTorch offers (NCHW, depthwise conv1 on a
replicated input, the input gradient as a forward convolution with flipped weights or as a
transposed convolution). The fastest formulation of each kernel is kept, whatever its layout
would cost to convert, and the sum is projected onto the full paper run:

    floor = T × E × Σ_k 64·⌊n_k / 64⌋ samples × (kernel time per sample) / workers

with Σ n_k = 54 000 (the protocol's Fashion-MNIST pool), each client's last partial batch
removed at its largest (63 samples), and perfect scaling over the workers. Everything else the
run does (pooling, ReLU, the linear layers, the optimiser, batching, the exact Fisher, evaluation)
is left out, so the real run cannot be faster than the floor with these kernels on this CPU. The
output says whether the 20-minute target lies above or below it, and prints beside each floor the
engine's whole grouped SGD step at the same shapes, with the engine's allocator setting and with
glibc's defaults (``fisherguard.allocator``), and every other part of the step (pools, ReLU,
linear layers, loss, optimiser, batch staging) timed alone against what issue 17's target 2
(training within 1.3x the floor) leaves them. A formulation whose result differs from the
engine's (beyond 1e-4 relative) is reported and not counted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import benchlib

benchlib.pin_threads(1)  # the engine's workers run one thread each (docs/performance.md §3)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fisherguard.allocator import retain_freed_memory  # noqa: E402
from fisherguard.clients.grouped import client_losses, group_input  # noqa: E402
from fisherguard.clients.training import TrainPlan, epoch_batches, make_optimizer  # noqa: E402
from fisherguard.data.transforms import Pipeline  # noqa: E402
from fisherguard.models import SimpleCNN, trainable  # noqa: E402

Tensor = torch.Tensor
CL = torch.channels_last
BATCH = 64
POOL = 54_000  # docs/protocol.md §2: the Fashion-MNIST client pool
TARGET_S = 20 * 60
conv_backward = torch.ops.aten.convolution_backward


def best_time(fn: Callable[[], object], reps: int) -> float:
    """Fastest of `reps` timed calls after warm-up: the floor wants the kernel at its best."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def kernels(g: int) -> dict[str, dict[str, Callable[[], object]]]:
    """Each kernel of one grouped SGD step, in every formulation PyTorch offers, at group size g."""
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(BATCH, g, 32, 32, generator=gen)  # folded conv1 input: one channel per client
    x1_cl = x1.contiguous(memory_format=CL)
    w1 = torch.randn(g * 6, 1, 5, 5, generator=gen)
    b1 = torch.randn(g * 6, generator=gen)
    go1 = torch.randn(BATCH, g * 6, 28, 28, generator=gen)
    x2 = torch.randn(BATCH, g * 6, 14, 14, generator=gen)
    w2 = torch.randn(g * 16, 6, 5, 5, generator=gen)
    b2 = torch.randn(g * 16, generator=gen)
    go2 = torch.randn(BATCH, g * 16, 10, 10, generator=gen)
    # per client (16, 6, 5, 5) -> (6, 16, 5, 5), flipped: the input gradient as a forward convolution
    w2_flip = w2.reshape(g, 16, 6, 5, 5).transpose(1, 2).flip(-1, -2).reshape(g * 6, 16, 5, 5).contiguous()
    t = {name: v.contiguous(memory_format=CL) for name, v in
         {"go1": go1, "x2": x2, "go2": go2}.items()}

    def dw_input() -> Tensor:  # each client's channel repeated for its 6 filters
        return x1_cl.unsqueeze(2).expand(BATCH, g, 6, 32, 32).reshape(BATCH, g * 6, 32, 32)

    x1_dw = dw_input().contiguous(memory_format=CL)
    no_grad = torch.no_grad()

    def fwd(x: Tensor, w: Tensor, b: Tensor | None, groups: int, padding: int = 0
            ) -> Callable[[], object]:
        def run() -> object:
            with no_grad:
                return F.conv2d(x, w, b, padding=padding, groups=groups)
        return run

    def bwd(go: Tensor, x: Tensor, w: Tensor, groups: int, mask: list[bool]) -> Callable[[], object]:
        return lambda: conv_backward(go, x, w, [w.shape[0]], [1, 1], [0, 0], [1, 1], False, [0, 0],
                                     groups, mask)

    def dw_fwd_with_copy() -> object:
        with no_grad:
            return F.conv2d(dw_input(), w1, b1, groups=g * 6)

    return {
        "conv1 forward": {
            "grouped, channels_last": fwd(x1_cl, w1, b1, g),
            "grouped, NCHW": fwd(x1, w1, b1, g),
            "depthwise on replicated input (copy included)": dw_fwd_with_copy,
        },
        "conv1 weight gradient": {
            "grouped, channels_last": bwd(t["go1"], x1_cl, w1, g, [False, True, True]),
            "grouped, NCHW": bwd(go1, x1, w1, g, [False, True, True]),
            "depthwise, channels_last": bwd(t["go1"], x1_dw, w1, g * 6, [False, True, True]),
        },
        "conv2 forward": {
            "grouped, channels_last": fwd(t["x2"], w2, b2, g),
            "grouped, NCHW": fwd(x2, w2, b2, g),
        },
        "conv2 input gradient": {
            "grouped, channels_last": bwd(t["go2"], t["x2"], w2, g, [True, False, False]),
            "grouped, NCHW": bwd(go2, x2, w2, g, [True, False, False]),
            "forward conv, flipped weights, padding 4": fwd(t["go2"], w2_flip, None, g, padding=4),
            "transposed conv": lambda: F.conv_transpose2d(t["go2"], w2, groups=g),
        },
        "conv2 weight gradient": {
            "grouped, channels_last": bwd(t["go2"], t["x2"], w2, g, [False, True, True]),
            "grouped, NCHW": bwd(go2, x2, w2, g, [False, True, True]),
        },
    }


def rest_of_step(g: int) -> dict[str, dict[str, Callable[[], object]]]:
    """Every other part of one grouped SGD step, alone at the engine's shapes (issue 17, target 2).

    Forward and backward of each (the gradient reaching its input and its parameters), the
    optimiser step and the batch staging of g grey clients. Target 2 wants the run's training
    within 1.3x the convolution floor, so all of these together get 0.3x of it.
    """
    gen = torch.Generator().manual_seed(2)
    shapes = [tuple(p.shape) for p in trainable(SimpleCNN())]

    def pool_relu(channels: int, size: int, layout: torch.memory_format) -> Callable[[], object]:
        h = torch.randn(BATCH, g * channels, size, size, generator=gen).contiguous(
            memory_format=layout).requires_grad_(True)
        go = torch.randn(BATCH, g * channels, size // 2, size // 2, generator=gen).contiguous(
            memory_format=layout)
        return lambda: torch.autograd.grad(F.relu(F.max_pool2d(h, 2)), h, go)

    lin = [torch.randn(g, *s, generator=gen).requires_grad_(True) for s in shapes[4:]]
    h_lin = torch.randn(BATCH, g * 400, generator=gen).requires_grad_(True)

    def linear() -> object:  # the engine's (G, B, 400) view of the flattened pool output
        h = h_lin.reshape(BATCH, g, -1).transpose(0, 1)
        n = len(lin) // 2
        for i in range(n):
            h = torch.baddbmm(lin[2 * i + 1].unsqueeze(1), h, lin[2 * i].transpose(1, 2))
            if i < n - 2:
                h = F.relu(h)
        return torch.autograd.grad(h.sum(), [h_lin, *lin])

    logits = torch.randn(g, BATCH, 10, generator=gen).requires_grad_(True)
    labels = torch.randint(0, 10, (g, BATCH), generator=gen)

    def loss() -> object:
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        return torch.autograd.grad(ce.view(g, -1).mean(1).sum(), logits)

    params = [torch.randn(g, *s, generator=gen).requires_grad_(True) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt = make_optimizer(params, TrainPlan())
    images = torch.randint(0, 256, (5_400, 1, 32, 32), dtype=torch.uint8, generator=gen)
    grey = Pipeline(grey=True, out_channels=1)
    batches = [epoch_batches(len(images), BATCH, gen)[0] for _ in range(g)]

    def staging() -> object:  # ClientDataset.batch of g grey clients, then the group's one copy
        return group_input([grey.train(images[idx], gen) for idx in batches])

    return {
        "pool1 + ReLU": {"channels_last": pool_relu(6, 28, CL),
                         "NCHW": pool_relu(6, 28, torch.contiguous_format)},
        "pool2 + ReLU": {"channels_last": pool_relu(16, 10, CL),
                         "NCHW": pool_relu(16, 10, torch.contiguous_format)},
        "linear layers + ReLU": {"baddbmm": linear},
        "cross-entropy": {"per client mean": loss},
        "optimiser step": {"fused SGD": opt.step},
        "batch staging": {"crop, normalise, one copy": staging},
    }


def outputs(result: object) -> list[Tensor]:
    if isinstance(result, Tensor):
        return [result]
    return [r for r in result if r is not None]  # type: ignore[union-attr]


def same(a: object, b: object) -> bool:
    """A formulation only counts when it computes what the first (the engine's) one does."""
    xs, ys = outputs(a), outputs(b)
    return len(xs) == len(ys) and all(
        x.shape == y.shape and float((x - y).abs().max()) <= 1e-4 * max(1.0, float(y.abs().max()))
        for x, y in zip(xs, ys))


def engine_step(g: int) -> Callable[[], object]:
    """One SGD step of the engine's grouped ensemble on random data, everything included."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.stack([p.detach().clone() for _ in range(g)]).requires_grad_(True)
              for p in trainable(SimpleCNN())]
    opt = make_optimizer(params, TrainPlan())
    x = torch.randn(BATCH, g, 32, 32, generator=gen).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (g, BATCH), generator=gen)

    def run() -> object:
        opt.zero_grad(set_to_none=True)
        client_losses(params, x, y, summed_conv1=True).sum().backward()
        opt.step()
        return None
    return run


def step_samples(epochs: int, rounds: int, clients: int) -> int:
    """Samples the paper run trains on at least: every client drops under 64 samples per epoch."""
    return rounds * epochs * (POOL - clients * (BATCH - 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", default="5,10", help="group sizes to time (default 5,10)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--workers", type=int, default=2, help="processes the run is spread over")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--json", type=Path, help="JSON-lines output (default benchmarks/results/)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    info = benchlib.system_info()
    benchlib.print_system(info)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.json or Path(__file__).resolve().parent / "results" / f"kernel-floor-{stamp}.jsonl"
    jl = benchlib.JsonLines(path, {"id": stamp, "mode": "floor"})
    jl.write("system", None, "", settings=info)
    samples = step_samples(args.epochs, args.rounds, args.clients)
    groups = [int(s) for s in args.groups.split(",")]
    # the engine keeps freed memory (runtime.retain_memory); show the step without it first
    plain = {g: best_time(engine_step(g), args.reps) / (g * BATCH) for g in groups}
    retained = retain_freed_memory()
    print(f"\n== Convolution-kernel floor of the paper run (1 thread per process, batch {BATCH} per "
          f"client; each kernel's fastest of {args.reps} calls)")
    floors: dict[int, float] = {}
    steps: dict[int, float] = {}
    where = "retained (runtime.retain_memory)" if retained else "returned to the OS (not glibc)"
    print(f"  allocator: freed memory {where}; kernels are timed that way")
    for g in groups:
        per_sample = 0.0
        print(f"\n  groups of {g} clients ({g * BATCH} samples per step)")
        for kernel, variants in kernels(g).items():
            ref = next(iter(variants.values()))()
            times = {}
            for name, fn in variants.items():
                if same(fn(), ref):
                    times[name] = best_time(fn, args.reps)
                else:
                    print(f"    {kernel:22s} {name:46s} DIFFERS from the engine's, not counted")
            best = min(times, key=times.__getitem__)
            per_sample += times[best] / (g * BATCH)
            for name, s in times.items():
                mark = "  <- kept" if name == best else ""
                print(f"    {kernel:22s} {name:46s} {s * 1e3:7.2f} ms{mark}")
                jl.write(f"floor/g{g}/{kernel}/{name}", s, "s", group=g)
        floor = samples * per_sample / args.workers
        floors[g] = floor
        step = best_time(engine_step(g), args.reps) / (g * BATCH)
        steps[g] = samples * step / args.workers
        print(f"    sum of the kept kernels: {per_sample * 1e6:.1f} µs per sample -> "
              f"{floor / 60:.1f} min for {samples} samples over {args.workers} workers")
        print(f"    for comparison, the engine's whole grouped SGD step: {step * 1e6:.1f} µs per sample "
              f"({per_sample / step:.0%} of it in these kernels) -> {samples * step / args.workers / 60:.1f} min")
        print(f"    the same step with glibc's default thresholds (freed memory returned, refaulted): "
              f"{plain[g] * 1e6:.1f} µs per sample ({plain[g] / step:.2f}x)")
        jl.write(f"floor/g{g}/engine_step", step, "s per sample", group=g, retained=retained)
        jl.write(f"floor/g{g}/engine_step_default_allocator", plain[g], "s per sample", group=g)
        jl.write(f"floor/g{g}/run", floor, "s", group=g, samples=samples, workers=args.workers,
                 per_sample_s=per_sample)
        rest = pools = 0.0
        print(f"    the rest of the step, each part alone (forward and backward) at its best:")
        for part, variants in rest_of_step(g).items():
            times = {name: best_time(fn, args.reps) for name, fn in variants.items()}
            best = min(times, key=times.__getitem__)
            part_s = times[best] / (g * BATCH)
            rest += part_s
            pools += part_s if part.startswith("pool") else 0.0
            for name, s in times.items():
                mark = "  <- kept" if name == best and len(times) > 1 else ""
                print(f"    {part:22s} {name:46s} {s * 1e3:7.2f} ms{mark}")
                jl.write(f"floor/g{g}/rest/{part}/{name}", s, "s", group=g)
        budget = 0.3 * per_sample  # target 2: training <= 1.3x the convolution floor
        print(f"    sum of the rest: {rest * 1e6:.1f} µs per sample (the engine's step spends "
              f"{(step - per_sample) * 1e6:.1f} beyond the kernels); kernels + rest = "
              f"{(per_sample + rest) / per_sample:.2f}x the kernel floor")
        print(f"    target 2 (training <= 1.3x the kernel floor) leaves everything but the convolutions "
              f"{budget * 1e6:.1f} µs per sample: "
              + ("below what these parts take alone, so out of reach with PyTorch's kernels for them"
                 if rest > budget else "above what these parts take alone"))
        # the last lever, a compiled convolution + pool + ReLU: at best the pools cost nothing
        print(f"    without the pools and their ReLU (a fused convolution + pool + ReLU kernel at the "
              f"convolutions' own cost): {(rest - pools) * 1e6:.1f} µs per sample, "
              + ("still over the budget" if rest - pools > budget else "within the budget"))
        jl.write(f"floor/g{g}/rest", rest, "s per sample", group=g, budget=budget, ok=rest <= budget,
                 without_pools=rest - pools)
    best_g = min(floors, key=floors.__getitem__)
    floor = floors[best_g]
    above = floor > TARGET_S
    print(f"\n  floor (best group size {best_g}): {floor / 60:.1f} min of convolution kernels alone "
          f"for T = {args.rounds}, E = {args.epochs}, Σn = {POOL}, {args.workers} workers × 1 thread")
    print(f"  target 3 (20 min) is {'BELOW' if above else 'above'} this floor: "
          + ("unreachable with PyTorch's CPU convolution kernels on this machine"
             if above else "reachable in principle; the floor leaves "
             f"{(TARGET_S - floor) / 60:.1f} min for everything else"))
    jl.write("floor/run", floor, "s", target="<= 1200", ok=not above, group=best_g)
    step_g = min(steps, key=steps.__getitem__)
    print(f"  the engine's whole step at its best (group size {step_g}, isolated, no batching, Fisher "
          f"or evaluation): {steps[step_g] / 60:.1f} min of training alone; target 3 is "
          + ("out of reach of this step" if steps[step_g] > TARGET_S else "within reach of this step"))
    jl.write("floor/engine_step_run", steps[step_g], "s", target="<= 1200",
             ok=steps[step_g] <= TARGET_S, group=step_g)
    return 0


if __name__ == "__main__":
    sys.exit(main())
