"""Training-step cost of ONE, OSAKD, KD, DML, OKDDip, BYOT and PCL relative to the plain model, measured side by side in one process.

    python benchmarks/speed.py --device cuda              # ResNet-32 b128 32 px, timm resnet50 b128 224 px
    python benchmarks/speed.py --device cuda --compile    # adds torch.compile rows
    python benchmarks/speed.py --device cuda --compile --compile-mode reduce-overhead   # CUDA graphs
    python benchmarks/speed.py --device cuda --profile    # adds a kernel profile of ONE m=3 per execution
    python benchmarks/speed.py --device cpu               # ResNet-32 b32 32 px, resnet50 b8 64 px (a few minutes)
    python benchmarks/speed.py --device cpu --models cifar_resnet32 resnet18:16:64   # NAME[:BATCH[:PX]]

Variants per model (--variants REGEX keeps the matching rows and plain; --executions picks the executions): plain;
ONE with 2, 3 and 4 branches, sequential, fused (skipped with the reason where a tail cannot be fused) and "auto"
(its timings and choice in the JSON); OSAKD (k=8) in-batch and with full banks of 4,096, 16,384 (the default) and
65,536 entries; KD from an untrained same-architecture teacher; DML with 2 peers; OKDDip with 4 branches; BYOT; PCL
with 3 peers, on their own views and on the batch as given ("no views"), in each execution.

A step is zero_grad, forward, loss, backward and an SGD (Nesterov, weight decay) update on a fixed random batch,
under bf16 autocast with channels_last on GPU (fp32, contiguous on CPU). After --warmup steps each, the variants take
turns one step at a time for --repeats rounds, so a change of load hits them alike; the median step is reported
(CUDA events on GPU, perf_counter on CPU), with the fastest: on a shared CPU the median is inflated, the minimum much
less. Peak memory (GPU only): resident tensors plus one step's transient peak (torch.cuda.max_memory_allocated).
FLOPs: torch.utils.flop_counter of one training forward, and of forward plus loss (OSAKD's k-NN distances).
--profile writes torch.profiler's operator table of 20 steps of plain, ONE m=3 and OSAKD to <json stem>_profile.txt.

Prints a table and writes benchmarks/results/speed_<device>_<date>.json and .png, on disk from the start and
rewritten after every round ("results": rows so far; "not_measured": every planned row not measured, and why).
--deadline SECONDS stops in time to write the table and plot; SIGTERM writes them too; --report FILE prints the table
of such a file.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import re
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kdwrap  # noqa: E402
import kdwrap.models  # noqa: E402,F401  (registers cifar_resnet* with timm)
from kdwrap.base import unwrap  # noqa: E402
from kdwrap.fused import FusionError  # noqa: E402
from kdwrap._timing import elapsed_ms  # noqa: E402
from kdwrap.fused.planner import EXECUTIONS  # noqa: E402
from common import (Deadline, Stopped, command_line, markdown_table, pyplot, read_rows, stop_on_sigterm,  # noqa: E402
                    write_json, write_text)

RESULTS = Path(__file__).resolve().parent / "results"
# name -> (batch, pixels, classes) per device kind.
CONFIGS = {
    "cuda": {"cifar_resnet32": (128, 32, 10), "resnet50": (128, 224, 1000)},
    "cpu": {"cifar_resnet32": (32, 32, 10), "resnet50": (8, 64, 1000), "lenet5": (64, 32, 10)},
}
def variant_specs(executions: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """(row name, method, kwargs): plain; ONE with 2, 3, 4 branches in each execution; OSAKD in-batch (the paper's
    mode), with its default bank (16,384 entries) and with a small and a large one; KD from a same-model teacher;
    DML with 2 peers; OKDDip with 4 branches and BYOT; PCL with 3 peers, each on its own view and, as the accuracy
    protocol without augmentation trains it, on the batch as given, in each execution."""
    one = [(f"ONE m={m} {e}", "one", {"branches": m, "execution": e}) for m in (2, 3, 4) for e in executions]
    osakd = [("OSAKD in-batch", "osakd", {"bank_size": 0})]
    osakd += [(f"OSAKD bank {n:,}", "osakd", {"bank_size": n}) for n in (4096, 16384, 65536)]
    others = [("KD same-model teacher", "kd", {}), ("DML 2 peers", "dml", {"peers": 2}),
              ("OKDDip m=4", "okddip", {"branches": 4}), ("BYOT", "byot", {})]
    pcl = [(f"PCL m=3 {e}", "pcl", {"branches": 3, "execution": e}) for e in executions]
    # As the family's accuracy protocol trains it (no augmentation there): every peer on the batch as given.
    pcl += [(f"PCL m=3 no views {e}", "pcl", {"branches": 3, "execution": e, "augment": None}) for e in executions]
    return [("plain", "plain", {}), *one, *osakd, *others, *pcl]


# method -> (net, pixels, options) -> (model, loss_fn).
WRAPPERS: dict[str, Callable[[nn.Module, int, dict[str, Any]], tuple[nn.Module, Any]]] = {
    "plain": lambda net, px, kw: (net, F.cross_entropy),
    "one": lambda net, px, kw: kdwrap.one(net, input_size=(3, px, px), **kw),
    "osakd": lambda net, px, kw: kdwrap.osakd(net, **kw),
    # A copy of the student as the teacher: its step-time ratio is the cost of one extra forward of the same network.
    "kd": lambda net, px, kw: kdwrap.kd(net, copy.deepcopy(net), **kw),
    "dml": lambda net, px, kw: kdwrap.dml(net, **kw),
    "okddip": lambda net, px, kw: kdwrap.okddip(net, input_size=(3, px, px), **kw),
    "byot": lambda net, px, kw: kdwrap.byot(net, input_size=(3, px, px), **kw),
    "pcl": lambda net, px, kw: kdwrap.pcl(net, input_size=(3, px, px), **kw),
}


GiB = 2**30
RESERVE_S = 10.0  # the last JSON, the table and the plot, kept free before a deadline
# A variant's build (creation, warm-up, FLOPs, memory) before any of its kind was built in this model: eager builds
# take about a second on a GPU; CUDA-graph compiles of ResNet-32 took 35 s for ONE m=3 on the H200.
FIRST_BUILD_GUESS_S = {False: 2.0, True: 45.0}
TIMING_SLACK = 1.25  # step-time spread over the estimate of one step


@dataclass
class Variant:
    name: str
    method: str
    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    compiled: bool = False
    cudagraphs: bool = False
    times_ms: list[float] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    build_s: float = 0.0  # creation to the first timed round: what the next build of its kind may take
    est_ms: float = 0.0  # one step after warm-up: what a round will take


class Results:
    """speed.py's JSON, kept on disk: every planned row is in "not_measured" (reason "pending") until it has timed
    steps, then in "results"; a row the deadline or an error left out keeps its reason there."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path, self.meta = path, meta
        self.order: list[tuple[Any, ...]] = []
        self.rows: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.missing: dict[tuple[Any, ...], str] = {}

    @staticmethod
    def key(model: str, batch: int, px: int, variant: str) -> tuple[Any, ...]:
        return model, batch, px, variant

    def plan(self, key: tuple[Any, ...]) -> None:
        self.order.append(key)
        self.missing[key] = "pending"

    def skip(self, key: tuple[Any, ...], reason: str) -> None:
        self.missing[key] = reason

    def measured(self, row: dict[str, Any]) -> None:
        key = self.key(row["model"], row["batch"], row["px"], row["variant"])
        self.rows[key] = row
        self.missing.pop(key, None)

    def finish(self, reason: str) -> None:
        """Rows never reached get ``reason``."""
        for key, why in self.missing.items():
            if why == "pending":
                self.missing[key] = reason

    def save(self) -> None:
        write_json(self.path, {
            "meta": self.meta,
            "results": [self.rows[k] for k in self.order if k in self.rows],
            "not_measured": [{"model": k[0], "batch": k[1], "px": k[2], "variant": k[3], "reason": self.missing[k]}
                             for k in self.order if k in self.missing],
        })


def parse_model(spec: str, device: str) -> tuple[str, int, int, int]:
    """``NAME[:BATCH[:PX]]`` -> (name, batch, pixels, classes), defaults from :data:`CONFIGS`."""
    name, *rest = spec.split(":")
    batch, px, classes = CONFIGS[device].get(name, (8 if device == "cpu" else 128, 64 if device == "cpu" else 224,
                                                    1000))
    if rest:
        batch = int(rest[0])
    if len(rest) > 1:
        px = int(rest[1])
    return name, batch, px, classes


def compiled_suffix(compile_: bool, mode: str, backend: str) -> str:
    """What a compiled row's name adds: ' +compile', ' +compile(reduce-overhead)', ' +compile(eager)'."""
    if not compile_:
        return ""
    if backend != "inductor":  # the dry runs' backend: a mode is inductor's
        return f" +compile({backend})"
    return " +compile" if mode == "default" else f" +compile({mode})"


def build_variant(name: str, method: str, kw: dict[str, Any], model_name: str, px: int, classes: int,
                  device: torch.device, memory_format: torch.memory_format, compile_: bool,
                  compile_mode: str = "default", compile_backend: str = "inductor") -> Variant:
    import timm

    torch.manual_seed(0)  # every variant starts from the same network
    net = timm.create_model(model_name, pretrained=False, num_classes=classes, in_chans=3)
    model, loss_fn = WRAPPERS[method](net, px, kw)
    model.to(device, memory_format=memory_format).train()
    if isinstance(loss_fn, nn.Module):
        loss_fn.to(device)
    if method == "osakd":
        fill_bank(loss_fn, classes, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if compile_ and compile_backend == "inductor":
        model = torch.compile(model, dynamic=False, mode=compile_mode)
    elif compile_:
        model = torch.compile(model, dynamic=False, backend=compile_backend)
    cudagraphs = (compile_ and compile_backend == "inductor" and device.type == "cuda"
                  and compile_mode in ("reduce-overhead", "max-autotune"))
    return Variant(name + compiled_suffix(compile_, compile_mode, compile_backend), method, model, loss_fn, optimizer,
                   compile_, cudagraphs)


@torch.no_grad()
def fill_bank(loss_fn: Any, classes: int, device: torch.device) -> None:
    """Fill OSAKD's bank with peaked random probability vectors: every timed step then searches a full bank."""
    gen = torch.Generator(device=device).manual_seed(1)
    bank = loss_fn.bank
    while bank.size and not bank.is_full:
        n = min(8192, bank.size - len(bank))
        p = (torch.randn(n, classes, device=device, generator=gen) * 3).softmax(1)
        bank.add(p, torch.randint(0, classes, (n,), device=device, generator=gen))


def train_step(v: Variant, x: torch.Tensor, y: torch.Tensor, autocast: Callable[[], Any]) -> None:
    if v.cudagraphs:  # a new iteration: the previous step's graph outputs may be overwritten
        torch.compiler.cudagraph_mark_step_begin()
    v.optimizer.zero_grad(set_to_none=True)
    with autocast():
        loss = v.loss_fn(v.model(x), y)
    loss.backward()
    v.optimizer.step()


def timed_step(v: Variant, x: torch.Tensor, y: torch.Tensor, autocast: Callable[[], Any],
               device: torch.device) -> float:
    """Milliseconds of one training step."""
    return elapsed_ms(lambda: train_step(v, x, y, autocast), device)


def resident_bytes(v: Variant) -> int:
    """Parameters, their gradients, optimizer state and the loss's buffers (OSAKD's bank) of one variant, with a KD
    teacher's weights (held outside ``parameters()``)."""
    teacher = getattr(unwrap(v.model), "teacher", None)
    params = list(v.model.parameters()) + (list(teacher.parameters()) if isinstance(teacher, nn.Module) else [])
    n = sum(p.numel() * p.element_size() * (2 if p.requires_grad else 1) for p in params)
    n += sum(t.numel() * t.element_size() for s in v.optimizer.state.values() for t in s.values()
             if isinstance(t, torch.Tensor))
    if isinstance(v.loss_fn, nn.Module):
        n += sum(b.numel() * b.element_size() for b in v.loss_fn.buffers())
    return n


def peak_memory(v: Variant, x: torch.Tensor, y: torch.Tensor, autocast: Callable[[], Any],
                device: torch.device) -> float:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    train_step(v, x, y, autocast)
    torch.cuda.synchronize(device)
    return (resident_bytes(v) + torch.cuda.max_memory_allocated(device) - before) / GiB


PROFILED = ("plain", "ONE m=3 sequential", "ONE m=3 fused", "ONE m=3 auto", "OSAKD in-batch", "OSAKD bank 16,384")
PROFILE_STEPS = 20  # one step's operators take microseconds on a CPU: a table over several steps is steadier


def execution_used(v: Variant, batch: int, device: torch.device) -> dict[str, Any] | None:
    """How a ONE variant ran its branches: the plan, and what execution="auto" timed to choose it."""
    model = unwrap(v.model)
    if not hasattr(model, "execution_timings"):
        return None
    timings = model.execution_timings
    if timings and not v.compiled:
        ms = next(iter(timings.values()))
        plan = min(ms, key=ms.__getitem__)
    else:  # compiled code follows the rule (auto cannot time inside torch.compile)
        plan = model.execution_plan(batch, device)
    return {"setting": model.execution, "plan": plan, "auto_timings_ms": timings}


def profile_step(v: Variant, x: torch.Tensor, y: torch.Tensor, autocast: Callable[[], Any],
                 device: torch.device) -> str:
    """torch.profiler's operator table of PROFILE_STEPS training steps: where the variant's time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    train_step(v, x, y, autocast)
    with profile(activities=activities) as prof:
        for _ in range(PROFILE_STEPS):
            train_step(v, x, y, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    head = f"totals over {PROFILE_STEPS} steps (divide by {PROFILE_STEPS} for one step)\n\n"
    if device.type != "cuda":
        return head + events.table(sort_by="self_cpu_time_total", row_limit=25) + "\n"
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / PROFILE_STEPS
    return (f"GPU kernels per step: {kernels:g}\n" + head
            + events.table(sort_by="device_time_total", row_limit=25) + "\n")


def count_flops(v: Variant, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """GFLOPs of one training-mode forward, and of forward + loss."""
    from torch.utils.flop_counter import FlopCounterMode

    model = getattr(v.model, "_orig_mod", v.model)  # count the eager module: same maths as the compiled one
    with torch.no_grad():
        with FlopCounterMode(display=False) as fwd:
            out = model(x)
        with FlopCounterMode(display=False) as loss:
            v.loss_fn(out, y)
    f = fwd.get_total_flops() / 1e9
    return f, f + loss.get_total_flops() / 1e9


def device_tag(device: torch.device) -> tuple[str, str]:
    """(file-name tag, description) of the device."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower(), name
    gpu = "" if torch.cuda.is_available() else ", no GPU"
    return "cpu", f"{os.cpu_count()}-core {platform.machine()} CPU{gpu}"


def wanted_variants(args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any]]]:
    """The variants --variants keeps (plain always: it is every ratio's base)."""
    return [(n, m, kw) for n, m, kw in variant_specs(args.executions)
            if not args.variants or n == "plain" or re.search(args.variants, n)]


def timing_s(variants: list[Variant], rounds: int) -> float:
    """Seconds that ``rounds`` side-by-side rounds of ``variants`` are expected to take."""
    return TIMING_SLACK * rounds * sum(v.est_ms for v in variants) / 1e3


def bench_model(spec: str, args: argparse.Namespace, device: torch.device, results: Results,
                deadline: Deadline) -> None:
    """Build, time and (--profile) profile one model's variants, keeping ``results`` on disk after every round.
    A variant is built only if its build and the timed rounds of everything built so far fit before ``deadline``
    (its plain row first: without it a ratio has no base); rounds stop when the next would not fit."""
    name, batch, px, classes = parse_model(spec, device.type)
    on_gpu = device.type == "cuda"
    memory_format = torch.channels_last if on_gpu else torch.contiguous_format
    autocast: Callable[[], Any] = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else nullcontext
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, px, px, device=device, generator=gen).contiguous(memory_format=memory_format)
    y = torch.randint(0, classes, (batch,), device=device, generator=gen)
    print(f"\n{name}, batch {batch}, {px} px, {classes} classes, "
          f"{'bf16 autocast, channels_last' if on_gpu else 'fp32'}; building variants...", flush=True)

    def key(vname: str) -> tuple[Any, ...]:
        return Results.key(name, batch, px, vname)

    variants: list[Variant] = []
    for compile_ in ([False, True] if args.compile else [False]):
        suffix = compiled_suffix(compile_, args.compile_mode, args.compile_backend)
        for vname, method, kw in wanted_variants(args):
            if method != "plain" and not any(v.compiled == compile_ and v.method == "plain" for v in variants):
                why = results.missing.get(key("plain" + suffix), "")  # a ratio needs its base: plain's reason
                why = why if why.startswith("not measured") else "not measured: no plain row"
                results.skip(key(vname + suffix), why)
                continue
            guess = max((v.build_s for v in variants if v.compiled == compile_), default=FIRST_BUILD_GUESS_S[compile_])
            if not deadline.allows(guess + timing_s(variants, args.repeats) + RESERVE_S):
                results.skip(key(vname + suffix), "not measured: deadline")
                continue
            t0 = time.perf_counter()
            try:
                v = build_variant(vname, method, kw, name, px, classes, device, memory_format, compile_,
                                  args.compile_mode, args.compile_backend)
            except FusionError as err:  # this model's tail has an op with no fusion rule: say which, go on
                print(f"  {vname}: skipped, {err}", flush=True)
                results.skip(key(vname + suffix), f"skipped: {err}")
                continue
            for _ in range(args.warmup):  # the first steps compile, autotune and allocate
                train_step(v, x, y, autocast)
            if on_gpu:
                torch.cuda.synchronize(device)
            v.result["warmup_s"] = round(time.perf_counter() - t0, 2)
            v.result["gflops_forward"], v.result["gflops_forward_loss"] = count_flops(v, x, y)
            v.result["peak_gib"] = peak_memory(v, x, y, autocast, device) if on_gpu else None
            v.result["execution"] = execution_used(v, batch, device)
            v.est_ms = timed_step(v, x, y, autocast, device)
            v.build_s = time.perf_counter() - t0
            print(f"  {v.name}: ready after {v.build_s:.1f} s", flush=True)
            variants.append(v)

    for _ in range(args.repeats):  # side by side: one step of each variant per round
        if not variants or not deadline.allows(timing_s(variants, 1) + RESERVE_S):
            break
        for v in variants:
            v.times_ms.append(timed_step(v, x, y, autocast, device))
        for row in model_rows(variants, name, batch, px, classes):
            results.measured(row)
        results.save()
    for v in variants:
        if not v.times_ms:
            results.skip(key(v.name), "not measured: deadline")
    if args.profile:
        for v in variants:
            if v.name.split(" +")[0] not in PROFILED:
                continue
            # The profiler's start-up is slow on a GPU (seconds): the profile is the suite's last step.
            if not deadline.allows(5 * PROFILE_STEPS * v.est_ms / 1e3 + 10 + RESERVE_S):
                args.profiles.append(f"## {name}, batch {batch}, {px} px: {v.name}\n\nnot profiled: deadline\n")
                continue
            args.profiles.append(f"## {name}, batch {batch}, {px} px: {v.name}\n\n"
                                 + profile_step(v, x, y, autocast, device))
            write_profiles(results, args.profiles)
    results.save()
    del variants
    if on_gpu:
        torch.cuda.empty_cache()


def model_rows(variants: list[Variant], name: str, batch: int, px: int, classes: int) -> list[dict[str, Any]]:
    """The rows of one model's variants that have timed steps, each against the plain row of its kind."""
    timed = [v for v in variants if v.times_ms]
    base = {v.compiled: v for v in timed if v.method == "plain"}
    eager_plain = statistics.median(base[False].times_ms) if False in base else None
    rows = []
    for v in timed:
        ref = base.get(v.compiled)
        ms = statistics.median(v.times_ms)
        rows.append({
            "model": name, "batch": batch, "px": px, "classes": classes, "variant": v.name, "compiled": v.compiled,
            "repeats": len(v.times_ms),
            "step_ms": round(ms, 3), "ratio": round(ms / statistics.median(ref.times_ms), 3) if ref else None,
            # The fastest step too: on a shared CPU, other jobs only ever add time, so the minimum is the steadier.
            "step_ms_min": round(min(v.times_ms), 3),
            "ratio_min": round(min(v.times_ms) / min(ref.times_ms), 3) if ref else None,
            "ratio_to_eager_plain": round(ms / eager_plain, 3) if eager_plain else None,
            "step_ms_all": [round(t, 3) for t in v.times_ms],
            # Run-to-run spread: the interquartile range of the timed steps.
            "step_ms_iqr": round(iqr(v.times_ms), 3),
            "execution": v.result["execution"],
            "peak_gib": None if v.result["peak_gib"] is None else round(v.result["peak_gib"], 3),
            "gflops_forward": round(v.result["gflops_forward"], 3),
            "flop_ratio": round(v.result["gflops_forward"] / ref.result["gflops_forward"], 3) if ref else None,
            "gflops_forward_loss": round(v.result["gflops_forward_loss"], 3),
            "warmup_s": v.result["warmup_s"],
        })
    return rows


def write_profiles(results: Results, profiles: list[str]) -> None:
    path = results.path.with_name(results.path.stem + "_profile.txt")
    write_text(path, f"# {results.meta['command']}; {results.meta['device']}, {results.meta['date']}\n\n"
               + "\n".join(profiles))


def iqr(xs: list[float]) -> float:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[2] - q[0]


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def format_table(rows: list[dict[str, Any]], missing: list[dict[str, Any]] = ()) -> str:
    """The measured ``rows``, then, per model, each row of ``missing`` (a JSON's "not_measured") with its reason."""
    header = ["model (batch, px)", "variant", "runs", "steps", "step ms (median)", "IQR ms", "x plain",
              "step ms (min)", "x plain (min)", "peak GiB", "fwd GFLOP", "fwd FLOP x plain", "fwd+loss GFLOP"]
    body = []
    where = list(dict.fromkeys((r["model"], r["batch"], r["px"]) for r in [*rows, *missing]))
    for model, batch, px in where:
        label = f"{model} ({batch}, {px})"
        for r in rows:
            if (r["model"], r["batch"], r["px"]) == (model, batch, px):
                body.append([label, r["variant"], r["execution"]["plan"] if r["execution"] else "",
                             str(r.get("repeats", len(r["step_ms_all"]))), f"{r['step_ms']:.2f}",
                             f"{r['step_ms_iqr']:.2f}", _num(r["ratio"]), f"{r['step_ms_min']:.2f}",
                             _num(r["ratio_min"]), _num(r["peak_gib"]), f"{r['gflops_forward']:.2f}",
                             _num(r["flop_ratio"]), f"{r['gflops_forward_loss']:.2f}"])
        for m in missing:
            if (m["model"], m["batch"], m["px"]) == (model, batch, px):
                why = "not measured: the run stopped first" if m["reason"] == "pending" else m["reason"]
                body.append([label, m["variant"], "", "0", why] + [""] * 8)
    return markdown_table(header, body)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, m in zip(axes[0], models):
        sub = [r for r in rows if r["model"] == m and r["ratio_to_eager_plain"] is not None]
        colors = ["tab:gray" if "plain" in r["variant"] else "tab:blue" if "ONE" in r["variant"] else "tab:orange"
                  for r in sub]
        bars = ax.bar(range(len(sub)), [r["ratio_to_eager_plain"] for r in sub], color=colors,
                      hatch=None, edgecolor="black", linewidth=0.5)
        for b, r in zip(bars, sub):
            if r["compiled"]:
                b.set_hatch("//")
            ax.annotate(f"{r['step_ms']:.1f} ms", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.6, linestyle="--")
        ax.set_xticks(range(len(sub)))
        ax.set_xticklabels([r["variant"].replace(" +compile", "\n+compile") for r in sub], rotation=45, ha="right",
                           fontsize=7)
        ax.set_ylabel("step time / eager plain step time")
        ax.set_title(f"{m}, batch {sub[0]['batch']}, {sub[0]['px']} px", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(path: Path) -> None:
    """Print the table of a speed.py JSON (finished or cut short) and draw its plot beside it."""
    meta, rows, missing, state = read_rows(path)
    print(f"\nTraining step, median of up to {meta['repeats']} side-by-side steps after {meta['warmup']} warm-up "
          f"steps; {meta['device']}, torch {meta['torch']}{state}\n")
    print(format_table(rows, missing))
    if rows and plot(rows, path.with_suffix(".png"),
                     f"kdwrap training-step time relative to the plain model; {meta['device']}, {meta['date']}"):
        print(f"wrote {path.with_suffix('.png')}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models", nargs="+", default=None, metavar="NAME[:BATCH[:PX]]",
                    help="default: cifar_resnet32 resnet50 with the device's sizes")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default: 25 GPU, 9 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first (default: 5 GPU, 2 CPU)")
    ap.add_argument("--compile", action="store_true", help="add torch.compile(dynamic=False) rows")
    ap.add_argument("--compile-mode", default="default",
                    choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                    help="torch.compile mode of the --compile rows (reduce-overhead: CUDA graphs)")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of the --compile rows (default inductor; eager: dynamo's trace run "
                    "eagerly, the CPU dry runs', since inductor takes minutes to compile on a small CPU)")
    ap.add_argument("--executions", nargs="+", default=list(EXECUTIONS), choices=list(EXECUTIONS),
                    help="ONE branch executions to time (default: auto sequential fused)")
    ap.add_argument("--variants", default=None, metavar="REGEX",
                    help="time only the variants whose name matches, e.g. 'plain|ONE m=3' (plain is always kept)")
    ap.add_argument("--profile", action="store_true",
                    help="write the operator profiles (20 steps of plain, ONE m=3, OSAKD) to <out>_profile.txt")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                    help="seconds from the start: build and time only what fits, then write the table and plot")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: results/speed_<device>_<date>.json)")
    ap.add_argument("--report", type=Path, default=None, metavar="JSON",
                    help="print the table of this speed.py JSON (finished or cut short) and draw its plot; no timing")
    args = ap.parse_args(argv)
    if args.report:
        return report(args.report)
    deadline = Deadline(args.deadline)
    stop_on_sigterm()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (25 if device.type == "cuda" else 9)
    args.warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 2)
    specs = args.models or list(CONFIGS[device.type])
    args.profiles = []

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    tag, desc = device_tag(device)
    date = datetime.date.today().isoformat()
    meta = {
        "date": date, "device": desc, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "repeats": args.repeats, "warmup": args.warmup, "compile_mode": args.compile_mode if args.compile else None,
        "compile_backend": args.compile_backend if args.compile else None,
        "precision": "bf16 autocast, channels_last" if device.type == "cuda" else "fp32",
        # On a shared machine figures taken under load are slower: keep the 1-minute load average with them.
        "loadavg_1min": [round(load_before[0], 2)], "seconds": None, "deadline_s": args.deadline,
        "complete": False, "stopped": None,
        "command": command_line("benchmarks/speed.py", argv if argv is not None else sys.argv[1:]),
    }
    out = args.out or RESULTS / f"speed_{tag}_{date}.json"
    results = Results(out, meta)
    for spec in specs:
        name, batch, px, _ = parse_model(spec, device.type)
        for compile_ in ([False, True] if args.compile else [False]):
            suffix = compiled_suffix(compile_, args.compile_mode, args.compile_backend)
            for vname, _, _ in wanted_variants(args):
                results.plan(Results.key(name, batch, px, vname + suffix))
    results.save()
    print(f"writing {out} after every round of timed steps", flush=True)
    try:
        for spec in specs:
            bench_model(spec, args, device, results, deadline)
    except Stopped:
        meta["stopped"] = "SIGTERM"
        print("\nSIGTERM: writing what was measured", flush=True)
    results.finish("not measured: the run was stopped (SIGTERM)" if meta["stopped"] else "not measured: deadline")
    meta.update(complete=meta["stopped"] is None, seconds=round(time.perf_counter() - t0, 1),
                loadavg_1min=[round(load_before[0], 2), round(os.getloadavg()[0], 2)])
    results.save()
    print(f"\nwrote {out}")
    if args.profiles:
        write_profiles(results, args.profiles)
        print(f"wrote {out.with_name(out.stem + '_profile.txt')}")
    report(out)


if __name__ == "__main__":
    main()
