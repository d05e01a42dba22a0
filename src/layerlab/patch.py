"""Training-free linear patches: each removed block of layers replaced by one linear map, folded into
the weights of the kept layer before it, so the shipped model has no extra module.

ReplaceMe (Shopkhoev et al., NeurIPS 2025; code github.com/mts-ai/ReplaceMe, `lstsq.py` and
`cosine_dist.py`) fits, on calibration tokens, a map T from the MLP output of the layer before the cut
to what the stream entering the layer after the cut needs, and multiplies it into that layer's
down-projection; LinearPatch (NeurIPS 2025) restricts the map to a Hadamard rotation around a
per-channel scale. Here, for every maximal run of removed layers s .. e-1 with p = s - 1 kept:

- X: the MLP output of layer p (Gemma 3: divided by its RMS, see below), B: the stream it is added to
  (`resid_mid.p`), Y: the full model's stream entering layer e (`resid_pre.e`; the last layer's output
  when the run reaches the end). All three come from ONE pass of the full model (`streams.py`).
- The patched layer adds X M instead of its MLP output, so its output is B + X M. The objective is
  `lstsq` (min |X M - (Y - B)|² + ridge, from the running sums XᵀX and XᵀY in float64, memory d x d
  however many tokens) or `cosine` (ReplaceMe's: max mean cos(B + X M, Y), a few hundred Adam steps on
  tokens streamed to disk, started from the lstsq solution).
- Forms of M: `full`; `diagonal` (a scale per channel); `hadamard` (H diag(s) Hᵀ, LinearPatch);
  `rotation` (Q diag(s), Q orthogonal).

What folds where (`Arch.mlp_output`, `Arch.mlp_output_norm`):
- Llama family, GPT-2: the MLP output is added as it is, so any M folds: down_proj.weight <- Mᵀ W (and
  its bias b <- b M; GPT-2's Conv1D W <- W M).
- Gemma 3 adds post_feedforward_layernorm(m) = m / rms(m) * g. A map applied to m changes rms(m) in a way
  no weight undoes unless it keeps norms, so in the normalized basis X = m / rms(m) only M = Q diag(s)
  folds: down_proj <- Qᵀ W (rms(m Q) = rms(m), eps included) and the norm's scale <- s. `full` and
  `hadamard` are refused there; `auto` picks `rotation` (Gemma 3) or `full` (others).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .arch import Arch, arch_of, decoder_layers, get_path
from .calibration import mixed_windows
from .errors import LayerlabError, SettingsError
from .evaluate.perplexity import Window, window_nll
from .hadamard import hadamard
from .plan import Plan
from .runtime import apply_plan, current_plan
from .settings import PatchSettings, check_patch_plan
from .streams import Gram, Recorder, TokenStore, place, stream_pass

NORM_FOLDABLE = ("diagonal", "rotation")  # the forms that pass through a norm on the MLP output


class PatchError(LayerlabError):
    """A patch that cannot be fitted or folded for this plan or model."""


@dataclass(frozen=True)
class Block:
    """A maximal run of removed layers and the kept layers around it."""

    first: int  # first removed layer
    last: int  # last removed layer
    kept: int  # the kept layer before the run: the patch folds into it
    after: int | None  # the kept layer after the run (None: the run reaches the end)


@dataclass
class BlockPatch:
    """The map fitted for one block, in the basis X of its kept layer's MLP output."""

    block: Block
    matrix: torch.Tensor = field(repr=False)  # M, float64 d x d
    branch_scale: torch.Tensor | None = field(repr=False)  # g of a norm on the MLP output (the branch adds X g)
    error_before: float  # |X M - (Y - B)|² / |Y - B|² with the layer as it is (no patch)
    error_after: float  # the same with the fitted M
    cosine_before: float | None = None  # mean cos(B + X M, Y) (cosine objective)
    cosine_after: float | None = None

    def branch_matrix(self) -> torch.Tensor:
        """The map on what the MLP branch adds to the stream: M, or diag(1/g) M behind a norm of scale g."""
        return self.matrix if self.branch_scale is None else self.matrix / self.branch_scale[:, None]

    def to_dict(self) -> dict:
        return {**asdict(self.block), "error_before": self.error_before, "error_after": self.error_after,
                "cosine_before": self.cosine_before, "cosine_after": self.cosine_after}


@dataclass
class PatchResult:
    """The patched model (plan materialized, maps folded) and what was fitted."""

    model: nn.Module | None
    plan: Plan
    settings: PatchSettings
    form: str  # the form fitted (`auto` resolved)
    patches: list[BlockPatch]
    tokens: int  # calibration tokens
    loss_before: float  # calibration NLL per token of the plan, unpatched
    loss_after: float  # and patched
    fit_seconds: float  # the stream pass and the solve
    seconds: float  # everything, the before / after check included

    @property
    def improved(self) -> bool:
        return self.loss_after < self.loss_before

    def summary(self) -> dict:
        return {"method": "patch", "plan": self.plan.to_text(), "form": self.form, "settings": asdict(self.settings),
                "tokens": self.tokens, "loss_before": self.loss_before, "loss_after": self.loss_after,
                "perplexity_before": math.exp(self.loss_before), "perplexity_after": math.exp(self.loss_after),
                "blocks": [p.to_dict() for p in self.patches], "fit_seconds": self.fit_seconds,
                "seconds": self.seconds}


def blocks(plan: Plan) -> list[Block]:
    """The removed runs of a plan that keeps whole layers in order (checked by `check_patchable`)."""
    kept = set(plan.layers)
    out, layer = [], 0
    while layer < plan.num_layers:
        if layer in kept:
            layer += 1
            continue
        first = layer
        while layer < plan.num_layers and layer not in kept:
            layer += 1
        out.append(Block(first, layer - 1, first - 1, layer if layer < plan.num_layers else None))
    return out


def resolve_form(arch: Arch, form: str) -> str:
    """`auto` as the most general form that folds for the architecture; an error for one that does not."""
    if form == "auto":
        return "rotation" if arch.mlp_output_norm else "full"
    if arch.mlp_output_norm and form not in NORM_FOLDABLE:
        raise PatchError(f"a {form!r} map cannot be folded through {arch.mlp_output_norm}: that RMSNorm rescales the "
                         "MLP output by its own norm, which only a rotation times a per-channel scale leaves intact; "
                         f"use form {' or '.join(NORM_FOLDABLE)}")
    return form


def check_patchable(model: nn.Module, plan: Plan, form: str = "auto") -> list[Block]:
    """The blocks to patch, or a one-line error before any work for a plan a patch cannot express."""
    if current_plan(model) is not None:
        raise PatchError("a plan is applied to the model at run time; restore it and pass the plan instead")
    resolve_form(arch_of(model), form)
    try:
        check_patch_plan(plan)
    except SettingsError as exc:
        raise PatchError(str(exc)) from None
    found = blocks(plan)
    return found


def patch(model: nn.Module, tokenizer, plan: Plan, settings: PatchSettings | None = None,
          progress: bool = True, materialize: bool = True, windows: list[Window] | None = None) -> PatchResult:
    """Fit a linear patch for every removed run of `plan` and fold it into a pruned copy of `model`.

    `model` is left as it was. With `materialize=False` only the fit and the calibration losses are
    returned (`result.model` is None; the losses come from the explicit maps on the plan at run time).
    `windows` replaces the calibration windows the settings name (already cut from them).
    """
    from .export.hf import materialize as build

    settings = settings or PatchSettings()
    found = check_patchable(model, plan, settings.form)
    form = resolve_form(arch_of(model), settings.form)
    windows = windows or mixed_windows(tokenizer, settings.calibration, settings.ctx, settings.tokens)
    started = time.perf_counter()
    patches = fit(model, windows, found, form, settings, progress)
    fitted = time.perf_counter() - started
    with apply_plan(model, plan):
        before = calibration_loss(model, windows)
    if materialize:
        patched = build(model, plan)
        fold(patched, plan, patches)
        after = calibration_loss(patched, windows)
    else:
        patched = None
        with apply_plan(model, plan):
            insert_maps(model, plan, patches)
            after = calibration_loss(model, windows)
    tokens = sum(len(w.ids) for w in windows)
    return PatchResult(patched, plan, settings, form, patches, tokens, before, after, fitted,
                       time.perf_counter() - started)


def calibration_loss(model: nn.Module, windows: list[Window], batch: int = 4) -> float:
    """Next-token NLL per scored token over the windows, as the model runs now."""
    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        nll, n = window_nll(model, windows[start:start + batch])
        total, count = total + nll, count + n
    return total / count


def _places(block: Block, n_layers: int) -> tuple[str, str, str]:
    target = place("resid_pre", block.after) if block.after is not None else place("resid_post", n_layers - 1)
    return place("mlp_out", block.kept), place("resid_mid", block.kept), target


def _basis(model: nn.Module, block: Block) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor | None]:
    """X from the recorded MLP output, and the norm scale g behind it (None without a norm on the output)."""
    arch = arch_of(model)
    if arch.mlp_output_norm is None:
        return (lambda m: m), None
    norm = get_path(decoder_layers(model)[block.kept], arch.mlp_output_norm)
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6))
    scale = (norm.weight.detach().double() + arch.norm_weight_offset)

    def normalized(m: torch.Tensor) -> torch.Tensor:
        m = m.double()
        return m * torch.rsqrt(m.pow(2).mean(-1, keepdim=True) + eps)

    return normalized, scale


def fit(model: nn.Module, windows: list[Window], found: list[Block], form: str, settings: PatchSettings,
        progress: bool = True) -> list[BlockPatch]:
    """One pass of the full model over the windows, reduced per block, then a map per block."""
    n_layers = len(decoder_layers(model))
    d = model.config.get_text_config(decoder=True).hidden_size
    bases = [_basis(model, b) for b in found]
    grams = [Gram(d) for _ in found]
    stores = [TokenStore(settings.store) for _ in found] if settings.objective == "cosine" else None
    places = [name for b in found for name in _places(b, n_layers)]

    def reduce(recorder: Recorder) -> None:
        for k, block in enumerate(found):
            m, base, target = (recorder[name][0] for name in _places(block, n_layers))
            x = bases[k][0](m)
            grams[k].add(x, target - base)
            if stores is not None:
                stores[k].add(x=x, b=base, y=target)

    try:
        stream_pass(model, [torch.tensor([w.ids]) for w in windows], None, places, reduce, progress, "calibration")
        return [_solve(block, grams[k], stores[k] if stores else None, bases[k][1], form, settings)
                for k, block in enumerate(found)]
    finally:
        for store in stores or ():
            store.close()


def _solve(block: Block, gram: Gram, store: TokenStore | None, scale: torch.Tensor | None, form: str,
           settings: PatchSettings) -> BlockPatch:
    """The map of one block from its sums (and its stored tokens for the cosine objective)."""
    d = gram.xtx.shape[0]
    identity = torch.eye(d, dtype=torch.float64) if scale is None else torch.diag(scale)
    ridge = settings.ridge * gram.xtx.diagonal().mean()
    matrix = least_squares(gram, form, ridge, settings)
    result = BlockPatch(block, matrix, scale, float(gram.squared_error(identity) / gram.yy), 0.0)
    if store is not None:
        result.cosine_before = mean_cosine(store, identity)
        result.matrix = _adam(form, matrix, lambda m, batch: 1 - _cosines(batch, m).mean(), settings,
                              store.batches(settings.batch_tokens, settings.steps,
                                            torch.Generator().manual_seed(settings.seed)))
        result.cosine_after = mean_cosine(store, result.matrix)
    result.error_after = float(gram.squared_error(result.matrix) / gram.yy)
    return result


def least_squares(gram: Gram, form: str, ridge: torch.Tensor | float, settings: PatchSettings) -> torch.Tensor:
    """argmin_M |X M - R|² + ridge |M|² within the form, from XᵀX and XᵀR."""
    c, b = gram.xtx, gram.xty
    eye = torch.eye(c.shape[0], dtype=torch.float64)
    if form == "full":
        return torch.linalg.solve(c + ridge * eye, b)
    if form == "diagonal":
        return torch.diag(b.diagonal() / (c.diagonal() + ridge))
    if form == "hadamard":
        h = hadamard(c.shape[0])
        scale = (h.T @ b @ h).diagonal() / ((h.T @ c @ h).diagonal() + ridge)
        return h @ torch.diag(scale) @ h.T
    # rotation: no closed form with the scale; start from Procrustes (the polar factor of XᵀR), then Adam
    u, _, vh = torch.linalg.svd(b)
    q = u @ vh
    scale = (q.T @ b).diagonal() / ((q.T @ c @ q).diagonal() + ridge)
    start = q @ torch.diag(scale)
    total = b.new_tensor(float(torch.trace(c)))  # a loss scale that makes lr mean the same for every model

    def loss(m: torch.Tensor, _) -> torch.Tensor:
        return ((m * (c @ m)).sum() - 2 * (m * b).sum() + ridge * (m * m).sum()) / total

    return _adam(form, start, loss, settings, iter([None] * settings.steps))


def _adam(form: str, start: torch.Tensor, loss, settings: PatchSettings, batches) -> torch.Tensor:
    """Adam steps on the form's parameters from `start`; `loss(M, batch)` for each batch."""
    d = start.shape[0]
    if form == "full":
        weight = start.clone().requires_grad_(True)
        params, build = [weight], lambda: weight
    elif form == "rotation":  # Q = Q0 Cayley(K), K skew; scale = s0 exp(σ): both start at the identity
        norms = start.norm(dim=0)
        q0, s0 = start / norms, norms
        skew = torch.zeros(d, d, dtype=torch.float64, requires_grad=True)
        log_scale = torch.zeros(d, dtype=torch.float64, requires_grad=True)
        eye = torch.eye(d, dtype=torch.float64)

        def build() -> torch.Tensor:
            k = skew - skew.T
            return q0 @ torch.linalg.solve(eye - k, eye + k) * (s0 * log_scale.exp())

        params = [skew, log_scale]
    else:  # diagonal / hadamard: the scale in the form's basis
        basis = torch.eye(d, dtype=torch.float64) if form == "diagonal" else hadamard(d)
        scale = (basis.T @ start @ basis).diagonal().clone().requires_grad_(True)
        params, build = [scale], lambda: basis @ torch.diag(scale) @ basis.T
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    for batch in batches:
        value = loss(build(), batch)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
    with torch.no_grad():
        return build().detach()


def _cosines(batch: dict[str, torch.Tensor], m: torch.Tensor) -> torch.Tensor:
    """cos(B + X M, Y) per token of a batch."""
    return F.cosine_similarity(batch["b"].double() + batch["x"].double() @ m, batch["y"].double(), dim=-1)


@torch.no_grad()
def mean_cosine(store: TokenStore, m: torch.Tensor) -> float:
    """Mean over every stored token of cos(B + X M, Y)."""
    total = sum(float(_cosines(chunk, m).sum()) for chunk in store.chunks(8192))
    return total / store.rows


class BranchMap(nn.Module):
    """A module followed by a linear map: what the patch does, as an explicit module (tests, distillation)."""

    def __init__(self, inner: nn.Module, matrix: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("matrix", matrix)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        out = self.inner(*args, **kwargs)
        return out @ self.matrix.to(out.dtype)


def branch_site(arch: Arch) -> str:
    """The last module of the MLP branch: the MLP, or the norm on its output."""
    return arch.mlp_output_norm or arch.mlp


def insert_maps(model: nn.Module, plan: Plan, patches: list[BlockPatch]) -> None:
    """Put each map as an explicit `BranchMap` after its kept layer's MLP branch.

    `model` runs `plan`'s steps: a materialized copy, or a model with the plan applied (then only the
    step modules change, not the source layers).
    """
    site = branch_site(arch_of(model))
    layers = decoder_layers(model)
    for p in patches:
        step = layers[plan.layers.index(p.block.kept)]
        inner = step._modules[site]
        step._modules[site] = BranchMap(inner, p.branch_matrix().to(next(step.parameters()).dtype))


@torch.no_grad()
def fold(model: nn.Module, plan: Plan, patches: list[BlockPatch]) -> None:
    """Multiply each map into the weights of its kept layer in a materialized copy of `plan` (in place)."""
    arch = arch_of(model)
    layers = decoder_layers(model)
    for p in patches:
        layer = layers[plan.layers.index(p.block.kept)]
        matrix = p.matrix
        if arch.mlp_output_norm:
            scale = matrix.norm(dim=0)
            rotation = matrix / scale
            eye = torch.eye(matrix.shape[0], dtype=torch.float64)
            if (rotation.T @ rotation - eye).abs().max() > 1e-6:
                raise PatchError(f"the map of layer {p.block.kept} is not a rotation times a scale, so it cannot be "
                                 f"folded through {arch.mlp_output_norm}")
            norm = get_path(layer, arch.mlp_output_norm)
            norm.weight.copy_(scale - arch.norm_weight_offset)
            matrix = rotation
        _multiply_output(get_path(layer, arch.mlp_output), matrix)


def _multiply_output(module: nn.Module, matrix: torch.Tensor) -> None:
    """Make a projection's output y become y M: nn.Linear (weight out x in) or GPT-2's Conv1D (in x out)."""
    weight = module.weight
    if isinstance(module, nn.Linear):
        weight.copy_((matrix.T @ weight.double()).to(weight.dtype))
    else:
        weight.copy_((weight.double() @ matrix).to(weight.dtype))
    if getattr(module, "bias", None) is not None:
        module.bias.copy_((module.bias.double() @ matrix).to(module.bias.dtype))

