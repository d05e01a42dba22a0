"""The residual stream at named places, recorded in one pass and reduced on the fly.

Places are TransformerLens-style names of plan step l (the step's position in the executed list;
with no plan applied, step l is layer l):
- `resid_pre.l`: the stream entering step l;
- `resid_mid.l`: the stream between its attention and MLP halves (the input of the MLP branch's first
  norm); for a step without MLP it is `resid_post.l`, for a step without attention `resid_pre.l`;
- `resid_post.l`: the stream leaving step l;
- `mlp_out.l`: what the step's MLP module returns, before any norm on its output (Gemma 3).

`Recorder` holds the tensors of the places asked for from the latest forward pass only, so memory is
bounded by one window, not by tokens x layers. What a caller keeps across windows is its reduction:
`Gram` (running XᵀX, XᵀY and squared norms in float64), `TokenStore` (rows streamed to a disk file and
read back in random batches), or its own sums (`metrics/similarity.py` keeps cosines; the search's
loss evaluator keeps the stream entering every step, which its prefix reuse needs).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import arch_of, decoder_layers
from .plan import Plan
from .runtime import SkippedAttention, SkippedMLP, apply_plan

KINDS = ("resid_pre", "resid_mid", "resid_post", "mlp_out")
STREAMS = "streams"  # as `places`: what `Recorder.streams()` needs (every step's input and the last output)


def place(kind: str, step: int) -> str:
    """The name of a place: `resid_pre.3`."""
    if kind not in KINDS:
        raise ValueError(f"unknown place kind {kind!r}; choose from {', '.join(KINDS)}")
    return f"{kind}.{step}"


def _parse(name: str) -> tuple[str, int]:
    kind, _, step = name.partition(".")
    if kind not in KINDS or not step.isdigit():
        raise ValueError(f"place {name!r} is not KIND.STEP with KIND in {', '.join(KINDS)}")
    return kind, int(step)


def _first(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class Recorder:
    """Forward hooks on the executed steps of `model` (apply a plan first) that keep the named places
    of the latest forward pass. `places=None` records every place of every step.

    Repeated steps share their norm and MLP modules (`runtime` makes shallow copies), so the place a
    shared module's hook writes is that of the step now running, which the step's pre-hook sets.
    With `detach=False` the tensors keep their autograd history (for losses on hidden states).
    """

    def __init__(self, model: nn.Module, places: Iterable[str] | str | None = None, detach: bool = True) -> None:
        arch = arch_of(model)
        self.steps = list(decoder_layers(model))
        self.detach = detach
        self._has_attention = [not isinstance(s._modules[arch.attention], SkippedAttention) for s in self.steps]
        self._has_mlp = [not isinstance(s._modules[arch.mlp], SkippedMLP) for s in self.steps]
        n = len(self.steps)
        if places == STREAMS:
            places = [place("resid_pre", i) for i in range(n)] + [place("resid_post", n - 1)]
        wanted = {place(k, i) for k in KINDS for i in range(n)} if places is None else set(places)
        parsed = {name: _parse(name) for name in wanted}
        for name, (_, step) in parsed.items():
            if step >= n:
                raise ValueError(f"place {name!r}: the model runs {n} steps")
        self.places = {name: self._source(kind, step) for name, (kind, step) in parsed.items()}
        self.values: dict[str, torch.Tensor] = {}
        self.current = 0  # the step now running
        self._handles = []
        self._hook(set(self.places.values()), arch)

    def _source(self, kind: str, step: int) -> tuple[str, int]:
        """Where a place is read: `resid_mid` of a step without one of its halves is another place."""
        if kind == "resid_mid" and not self._has_mlp[step]:
            return "resid_post", step
        if kind == "resid_mid" and not self._has_attention[step]:
            return "resid_pre", step
        return kind, step

    def _hook(self, sources: set[tuple[str, int]], arch) -> None:
        shared: dict[str, dict[int, nn.Module]] = {"resid_mid": {}, "mlp_out": {}}
        for i, step in enumerate(self.steps):
            self._handles.append(step.register_forward_pre_hook(self._enter(i, ("resid_pre", i) in sources),
                                                                with_kwargs=True))
            if ("resid_post", i) in sources:
                self._handles.append(step.register_forward_hook(self._leave(i)))
            if ("resid_mid", i) in sources:
                norm = step._modules[arch.mlp_norms[0]]
                shared["resid_mid"][id(norm)] = norm
            if ("mlp_out", i) in sources:
                shared["mlp_out"][id(step._modules[arch.mlp])] = step._modules[arch.mlp]
        for norm in shared["resid_mid"].values():
            self._handles.append(norm.register_forward_pre_hook(self._keep_mid, with_kwargs=True))
        for mlp in shared["mlp_out"].values():
            self._handles.append(mlp.register_forward_hook(self._keep_mlp_out))

    def _store(self, kind: str, step: int, value: torch.Tensor) -> None:
        self.values[f"{kind}.{step}"] = value.detach() if self.detach else value

    def _enter(self, index: int, keep: bool):
        def hook(module, args, kwargs):
            self.current = index
            if keep:
                self._store("resid_pre", index, _first(args, kwargs))
        return hook

    def _leave(self, index: int):
        def hook(module, args, output):
            self._store("resid_post", index, output[0] if isinstance(output, tuple) else output)
        return hook

    def _keep_mid(self, module, args, kwargs) -> None:
        self._store("resid_mid", self.current, _first(args, kwargs))

    def _keep_mlp_out(self, module, args, output) -> None:
        self._store("mlp_out", self.current, output)

    def __getitem__(self, name: str) -> torch.Tensor:
        """The tensor of a place from the latest forward pass, (batch, tokens, d)."""
        kind, step = self.places[name]
        return self.values[f"{kind}.{step}"]

    def streams(self, sequence: int = 0) -> torch.Tensor:
        """One sequence's streams x^0 .. x^L, (steps + 1, T, d): each step's input, then the last output."""
        last = len(self.steps) - 1
        return torch.stack([self[place("resid_pre", i)][sequence] for i in range(len(self.steps))]
                           + [self[place("resid_post", last)][sequence]])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@torch.inference_mode()
def record(model: nn.Module, ids: torch.Tensor, plan: Plan | None = None,
           places: Iterable[str] | str | None = None) -> Recorder:
    """One forward pass of `ids` under `plan` (identity by default); the returned recorder holds the places."""
    with apply_plan(model, plan or Plan.identity(len(decoder_layers(model)))), Recorder(model, places) as recorder:
        model(ids, use_cache=False)
    return recorder


@torch.inference_mode()
def stream_pass(model: nn.Module, windows: Iterable[torch.Tensor], plan: Plan | None, places: Iterable[str] | None,
                reduce: Callable[[Recorder], None], progress: bool = False, desc: str = "streams") -> None:
    """Run every window of token ids (each `[batch, tokens]`) under `plan` and hand the places to `reduce`."""
    windows = list(windows)
    with apply_plan(model, plan or Plan.identity(len(decoder_layers(model)))), Recorder(model, places) as recorder:
        for ids in tqdm(windows, desc=desc, unit="window", disable=not progress, leave=False):
            model(ids.to(model.device), use_cache=False)
            reduce(recorder)


class Gram:
    """Running sums for a least-squares fit of Y from X over tokens, in float64: XᵀX, XᵀY, ΣX, |Y|², count.

    Memory is d x d per sum however many tokens pass through.
    """

    def __init__(self, d_in: int, d_out: int | None = None, device: torch.device | str = "cpu") -> None:
        d_out = d_in if d_out is None else d_out
        self.xtx = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
        self.xty = torch.zeros(d_in, d_out, dtype=torch.float64, device=device)
        self.yy = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows of X and Y (any leading shape, last axis the features)."""
        x = x.reshape(-1, x.shape[-1]).double()
        y = y.reshape(-1, y.shape[-1]).double()
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.yy += (y * y).sum()
        self.count += x.shape[0]

    def squared_error(self, m: torch.Tensor) -> torch.Tensor:
        """Σ_t |x_t M - y_t|², from the sums alone."""
        m = m.double()
        return (m * (self.xtx @ m)).sum() - 2 * (m * self.xty).sum() + self.yy


class TokenStore:
    """Rows of named columns (tokens x width, float32) streamed to files on disk, read back in batches.

    Only the batch being read is in memory, so the number of tokens is bounded by the disk. The files
    live in a temporary folder (inside `folder` when given) removed by `close()`.
    """

    def __init__(self, folder: str | Path | None = None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="layerlab-streams-", dir=folder)
        self._files: dict[str, object] = {}
        self._widths: dict[str, int] = {}
        self.rows = 0

    def add(self, **columns: torch.Tensor) -> None:
        """Append rows; every call gives every column the same number of rows."""
        arrays = {name: v.detach().reshape(-1, v.shape[-1]).float().cpu().numpy() for name, v in columns.items()}
        counts = {a.shape[0] for a in arrays.values()}
        if len(counts) != 1 or (self._files and set(arrays) != set(self._files)):
            raise ValueError("every call needs the same columns, each with the same number of rows")
        for name, array in arrays.items():
            if name not in self._files:
                self._files[name] = open(Path(self._dir.name) / f"{name}.f32", "ab")  # noqa: SIM115 closed in close()
                self._widths[name] = array.shape[1]
            self._files[name].write(array.tobytes())
        self.rows += counts.pop()

    def _arrays(self) -> dict[str, np.memmap]:
        for handle in self._files.values():
            handle.flush()
        return {name: np.memmap(Path(self._dir.name) / f"{name}.f32", dtype=np.float32, mode="r",
                                shape=(self.rows, self._widths[name])) for name in self._files}

    def batches(self, size: int, steps: int, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        """`steps` batches of `size` rows drawn at random (sorted indices: sequential reads)."""
        arrays = self._arrays()
        for _ in range(steps):
            index = torch.randint(self.rows, (min(size, self.rows),), generator=generator).sort().values.numpy()
            yield {name: torch.from_numpy(np.ascontiguousarray(array[index])) for name, array in arrays.items()}

    def chunks(self, size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Every row once, in order, `size` rows at a time."""
        arrays = self._arrays()
        for start in range(0, self.rows, size):
            yield {name: torch.from_numpy(np.array(array[start:start + size])) for name, array in arrays.items()}

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._dir.cleanup()

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
