"""Training-loop helpers shared by the setup tests: a few SGD steps (optionally one rank's half of each batch), two
runs of other arithmetic (DDP against one process, channels_last against contiguous) compared in lockstep, continuing
a checkpointed run in a fresh Python process (bit-exact resume), torch.compile against eager."""
import copy
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import torch
from torch import nn

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path[:0] = [{tests!r}, {module_dir!r}]
    import kdwrap
    from conftest import TinyNet
    from {module} import _batch
    torch.set_num_threads({threads})  # the uninterrupted run's: float sums depend on how the work is split
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    model, loss_fn = {build}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ckpt = torch.load({path!r})
    model.load_state_dict(ckpt["model"]); opt.load_state_dict(ckpt["opt"]); loss_fn.load_state_dict(ckpt["loss"])
    losses = []
    for step in range({start}, {stop}):
        x, y = _batch(step)
        loss = loss_fn(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    print(repr((losses, loss_fn.step)))
    """
)


def resume_in_fresh_process(path: Path, build: str, module: str, start: int, stop: int) -> tuple[list[float], int]:
    """Build the wrapper with the expression ``build``, load checkpoint ``path`` (keys model/opt/loss), run steps
    ``start..stop-1`` on ``module._batch(step)`` with SGD(lr=0.1, momentum=0.9); return (losses, loss_fn.step)."""
    script = SCRIPT.format(
        tests=str(Path(__file__).parent), module=module, module_dir=str(Path(sys.modules[module].__file__).parent),
        threads=torch.get_num_threads(), build=build, path=str(path), start=start, stop=stop,
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return eval(out.stdout.strip().splitlines()[-1])


def _sgd(model) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def train_steps(model, loss_fn, forward, batch: Callable, steps: int, rank: int | None = None) -> list[float]:
    """``steps`` SGD(lr=0.1, momentum=0.9) steps on ``batch(step)``; with ``rank`` (0 or 1), on that half of it."""
    opt = _sgd(model)
    losses = []
    for step in range(steps):
        x, y = batch(step)
        if rank is not None:
            half = slice(rank * len(y) // 2, (rank + 1) * len(y) // 2)
            x, y = x[half], y[half]
        loss = loss_fn(forward(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def sgd_step(model, loss_fn, forward, opt, x, y) -> float:
    """One SGD step of ``loss_fn(forward(x), y)``; returns the loss."""
    loss = loss_fn(forward(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def snapshot(model, loss_fn, opt) -> dict:
    """A copy of the whole training state: model, optimizer and loss (keys model/opt/loss)."""
    return copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "loss": loss_fn.state_dict()})


def restore(model, loss_fn, opt, state: dict) -> None:
    """Load a :func:`snapshot` (a copy of it: loading an optimizer state in process aliases its buffers)."""
    state = copy.deepcopy(state)
    model.load_state_dict(state["model"]), opt.load_state_dict(state["opt"]), loss_fn.load_state_dict(state["loss"])


# Why lockstep: two computations whose sums run in another order (DDP's all-reduce of two half-batch gradients against
# one whole-batch gradient, NHWC against NCHW kernels) agree to ~1e-6 after one step, but compared after n free-running
# SGD steps at lr 0.1 the rounding differences grow step by step, by how much depending on the CPU's kernels (a
# percent after three steps on an AVX-512 CPU). Each step of the second run therefore starts from the first's state:
# every comparison is of one step, at float tolerance, wherever the tests run.


def reference_states(model, loss_fn, batch: Callable, steps: int) -> list[dict]:
    """``steps`` SGD(lr=0.1, momentum=0.9) steps of one process on the whole of each ``batch(step)``; returns the
    :func:`snapshot` before every step and after the last (``steps + 1`` of them)."""
    opt = _sgd(model)
    states = [snapshot(model, loss_fn, opt)]
    for step in range(steps):
        sgd_step(model, loss_fn, model, opt, *batch(step))
        states.append(snapshot(model, loss_fn, opt))
    return states


def lockstep_rank_states(model, loss_fn, forward, batch: Callable, states: list[dict], rank: int) -> list[dict]:
    """On rank ``rank`` (0 or 1) of a DDP run: for each step, load ``states[step]`` (the one-process run's state
    before it, see :func:`reference_states`), then one SGD(lr=0.1, momentum=0.9) step through ``forward`` (the DDP
    wrapper) on this rank's half of ``batch(step)``; returns the :func:`snapshot` after each step."""
    opt = _sgd(model)
    after = []
    for step in range(len(states) - 1):
        restore(model, loss_fn, opt, states[step])
        x, y = batch(step)
        half = slice(rank * len(y) // 2, (rank + 1) * len(y) // 2)
        sgd_step(model, loss_fn, forward, opt, x[half], y[half])
        after.append(snapshot(model, loss_fn, opt))
    return after


def train_in_lockstep(lead, follow, steps: int, check: Callable) -> None:
    """``lead`` and ``follow``, each ``(model, loss_fn, batch)``: ``steps`` SGD(lr=0.1, momentum=0.9) steps of each
    on its ``batch(step)``, in lockstep: before each step ``follow`` loads ``lead``'s whole state (model, optimizer,
    loss), and both draw from torch's RNG seeded alike. After each step, ``check(step, lead_loss, follow_loss)``
    compares the two: one step's difference, at float tolerance."""
    (model, loss_fn, batch), (f_model, f_loss_fn, f_batch) = lead, follow
    opt, f_opt = _sgd(model), _sgd(f_model)
    for step in range(steps):
        restore(f_model, f_loss_fn, f_opt, snapshot(model, loss_fn, opt))
        losses = []
        for m, fn, o, b in ((model, loss_fn, opt, batch), (f_model, f_loss_fn, f_opt, f_batch)):
            torch.manual_seed(1000 + step)
            losses.append(sgd_step(m, fn, m, o, *b(step)))
        check(step, *losses)


def assert_states_close(got: dict, want: dict, name: str, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Two state dicts (of a model or of a loss) hold the same keys; floating-point tensors agree at the
    tolerance, everything else exactly."""
    assert got.keys() == want.keys(), name
    for key, value in want.items():
        if torch.is_tensor(value) and value.is_floating_point():
            torch.testing.assert_close(got[key], value, atol=atol, rtol=rtol, msg=lambda m, k=key: f"{name} {k}: {m}")
        elif torch.is_tensor(value):
            assert torch.equal(got[key], value), f"{name} {key}"
        else:
            assert got[key] == value, f"{name} {key}"


def _sgd_steps(model, loss_fn, opt, batch: Callable, steps: range, save_at: int | None = None,
               path: Path | None = None) -> list[float]:
    """SGD steps on ``batch(step)`` for ``step`` in ``steps``; before step ``save_at``, checkpoint model, optimizer
    and loss state to ``path`` (keys model/opt/loss, what the resume helpers load)."""
    losses = []
    for step in steps:
        if step == save_at:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "loss": loss_fn.state_dict()}, path)
        x, y = batch(step)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_resume_is_bit_exact(tmp_path: Path, build: str, module: str, batch: Callable, save_at: int, steps: int):
    """Train ``steps`` steps of the wrapper ``build`` (an expression over ``kdwrap`` and ``TinyNet``), checkpoint
    before step ``save_at``, resume that checkpoint in a fresh process: its losses and step count must be equal."""
    import kdwrap
    from conftest import TinyNet

    torch.manual_seed(0)
    model, loss_fn = eval(build, {"kdwrap": kdwrap, "TinyNet": TinyNet})
    path = tmp_path / "ckpt.pt"
    losses = _sgd_steps(model, loss_fn, _sgd(model), batch, range(steps), save_at, path)
    assert resume_in_fresh_process(path, build, module, save_at, steps) == (losses[save_at:], steps)


def assert_resume_in_process_is_exact(tmp_path: Path, build: Callable, batch: Callable, save_at: int, steps: int):
    """Train ``steps`` steps of ``build()``, checkpoint before step ``save_at``; then build a wrapper from other
    initial weights, load the checkpoint and continue: the same losses and step count, bit for bit. The in-process
    form of :func:`assert_resume_is_bit_exact`, for methods without state beyond the state dicts (no RNG use)."""
    torch.manual_seed(0)
    model, loss_fn = build()
    path = tmp_path / "ckpt.pt"
    losses = _sgd_steps(model, loss_fn, _sgd(model), batch, range(steps), save_at, path)
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    model, loss_fn = build()
    opt = _sgd(model)
    ckpt = torch.load(path)
    model.load_state_dict(ckpt["model"]), opt.load_state_dict(ckpt["opt"]), loss_fn.load_state_dict(ckpt["loss"])
    resumed = _sgd_steps(model, loss_fn, opt, batch, range(save_at, steps))
    assert (resumed, loss_fn.step) == (losses[save_at:], steps)


def assert_compiles_without_graph_break(make: Callable, batch: Callable) -> None:
    """``make()`` gives ``(model, loss_fn)``: its forward traces with no graph break, and the compiled model's loss
    on ``batch(0)`` equals a fresh eager wrapper's (``make`` seeds its own initial weights)."""
    model, loss_fn = make()
    x, y = batch(0)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    model.take_capture()
    compiled = torch.compile(model)
    loss = loss_fn(compiled(x), y)
    loss.backward()
    eager, eager_loss = make()
    torch.testing.assert_close(loss, eager_loss(eager(x), y), atol=1e-5, rtol=1e-5)


def is_channels_last(t: torch.Tensor) -> bool:
    """Channels-last and not also contiguous (a 1x1 map or a single channel is both)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def record_conv_input_layouts(model: nn.Module) -> tuple[dict[str, bool], list]:
    """Hooks recording, per Conv2d module called, whether its input was channels_last; and their handles."""
    seen: dict[str, bool] = {}
    handles = [
        m.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, is_channels_last(args[0])))
        for name, m in model.named_modules() if isinstance(m, nn.Conv2d)
    ]
    return seen, handles


def train_channels_last_beside_contiguous(make: Callable, batch: Callable, steps: int,
                                          check: Callable | None = None) -> tuple[tuple, tuple]:
    """Two runs of ``make()`` (a ``(model, loss_fn)``): one moved to channels_last and fed channels_last batches, one
    contiguous, trained in lockstep (:func:`train_in_lockstep`, the channels_last run leading). After each step the
    losses, the models' and the losses' states agree at float tolerance, and ``check(step, loss_fn)`` (if given)
    looks at the leading run. Returns ``(model, loss_fn, seen)`` of the channels_last run, then of the contiguous
    one, ``seen`` being the layouts each conv module's input had (:func:`record_conv_input_layouts`)."""
    runs = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        model, loss_fn = make()
        model = model.to(memory_format=fmt)
        seen, handles = record_conv_input_layouts(model)

        def fmt_batch(step, fmt=fmt):
            x, y = batch(step)
            return x.contiguous(memory_format=fmt), y

        runs[fmt] = model, loss_fn, fmt_batch, seen, handles
    model, loss_fn, cl_batch, seen, handles = runs[torch.channels_last]
    plain, plain_loss_fn, plain_batch, plain_seen, plain_handles = runs[torch.contiguous_format]

    def compare(step, loss, plain_loss):
        torch.testing.assert_close(plain_loss, loss, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {step}: {m}")
        assert_states_close(plain.state_dict(), model.state_dict(), f"step {step}: model")  # BN statistics too
        assert_states_close(plain_loss_fn.state_dict(), loss_fn.state_dict(), f"step {step}: loss")
        if check is not None:
            check(step, loss_fn)

    train_in_lockstep((model, loss_fn, cl_batch), (plain, plain_loss_fn, plain_batch), steps, compare)
    for h in handles + plain_handles:
        h.remove()
    return (model, loss_fn, seen), (plain, plain_loss_fn, plain_seen)
