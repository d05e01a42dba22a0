"""Independent reference computations the runtime is checked against."""

from __future__ import annotations

import copy
import functools
import math

import torch
from transformers import AutoModelForCausalLM

from layerlab.arch import arch_of
from layerlab.plan import Plan


def physical_copy(model, layers: list[int]):
    """A freshly built model whose decoder layers are copies of `layers`, in that order."""
    config = copy.deepcopy(model.config)
    text = config.get_text_config(decoder=True)
    types = getattr(text, "layer_types", None)
    text.num_hidden_layers = len(layers)
    if types is not None:
        text.layer_types = [types[i] for i in layers]
    new = AutoModelForCausalLM.from_config(config).to(model.dtype).eval()
    prefix = arch_of(model).layers + "."
    source = model.state_dict()
    state = {k: v for k, v in source.items() if not k.startswith(prefix)}
    for j, src in enumerate(layers):
        for key, value in source.items():
            if key.startswith(f"{prefix}{src}."):
                state[f"{prefix}{j}." + key[len(f"{prefix}{src}."):]] = value.clone()
    new.load_state_dict(state, strict=True)
    return new


def _additive_mask(length: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[None, None]


@torch.no_grad()
def manual_states(model, ids: torch.Tensor, plan: Plan) -> tuple[list[tuple], torch.Tensor]:
    """Each step's (h_in, h_mid, h_out), computed by calling the layer's submodules by hand
    (Llama and Gemma 3 layouts), and the final hidden state."""
    base, config = model.model, model.config
    gemma = config.model_type == "gemma3_text"
    h = base.embed_tokens(ids)
    positions = torch.arange(ids.shape[1])[None]
    states = []
    for step in plan.steps:
        layer = base.layers[step.layer]
        if gemma:
            kind = config.layer_types[step.layer]
            pe = base.rotary_emb(h, positions, kind)
            window = config.sliding_window if kind == "sliding_attention" else None
        else:
            pe, window = base.rotary_emb(h, positions), None
        mask = _additive_mask(ids.shape[1], window, h.dtype)
        h_in = h
        if step.attention:
            normed = layer.input_layernorm(h)
            out = layer.self_attn(hidden_states=normed, position_embeddings=pe, attention_mask=mask)[0]
            h = h + (layer.post_attention_layernorm(out) if gemma else out)
        h_mid = h
        if step.mlp:
            if gemma:
                h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
            else:
                h = h + layer.mlp(layer.post_attention_layernorm(h))
        states.append((h_in, h_mid, h))
    return states, h


@torch.no_grad()
def manual_logits(model, ids: torch.Tensor, plan: Plan) -> torch.Tensor:
    """The plan's logits from the hand-computed forward of `manual_states`."""
    _, h = manual_states(model, ids, plan)
    logits = model.lm_head(model.model.norm(h))
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.no_grad()
def greedy_without_cache(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding that recomputes the whole sequence for every token."""
    for _ in range(new_tokens):
        logits = model(ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def _heads(t: torch.Tensor, shape: tuple) -> torch.Tensor:
    return t.view(shape).transpose(1, 2)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


@torch.no_grad()
def manual_kv_logits(model, ids: torch.Tensor, plan: Plan, stored=None) -> torch.Tensor:
    """The plan's logits with KV sharing, attention written out by hand (Llama-like and Gemma 3 layouts):
    a consumer step projects only its queries and attends over its source step's rotated keys and values.
    `stored(tensor)`, when given, is what a cache gives back for keys and values it stored (quantization)."""
    base, config = model.model, model.config
    gemma = config.model_type == "gemma3_text"
    batch, length = ids.shape
    h = base.embed_tokens(ids)
    positions = torch.arange(length)[None]
    sources = plan.kv_source_steps
    shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, step in enumerate(plan.steps):
        layer = base.layers[step.layer]
        kind = config.layer_types[step.layer] if gemma else None
        cos, sin = base.rotary_emb(h, positions, kind) if gemma else base.rotary_emb(h, positions)
        window = config.sliding_window if kind == "sliding_attention" else None
        if step.attention:
            att = layer.self_attn
            x = layer.input_layernorm(h)
            heads = functools.partial(_heads, shape=(batch, length, -1, att.head_dim))
            q = heads(att.q_proj(x))
            q = _rotate(att.q_norm(q) if hasattr(att, "q_norm") else q, cos, sin)
            if sources[i] is None:
                k, v = heads(att.k_proj(x)), heads(att.v_proj(x))
                k = _rotate(att.k_norm(k) if hasattr(att, "k_norm") else k, cos, sin)
                shared[i] = (k, v) if stored is None else (stored(k), stored(v))
            k, v = shared[i if sources[i] is None else sources[i]]
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            scores = q @ k.transpose(-1, -2) * att.scaling + _additive_mask(length, window, h.dtype)
            out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(batch, length, -1)
            out = att.o_proj(out)
            h = h + (layer.post_attention_layernorm(out) if gemma else out)
        if step.mlp:
            if gemma:
                h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
            else:
                h = h + layer.mlp(layer.post_attention_layernorm(h))
    logits = model.lm_head(model.model.norm(h))
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def slerp_restore(first: torch.Tensor, second: torch.Tensor, max_angle: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniCache by its definition, in float64: each vector's norm times the SLERP (t = 1/2) of both unit vectors,
    except token-heads more than `max_angle` degrees apart, which stay as they are."""
    a, b = first.double(), second.double()
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na, b / nb
    theta = torch.arccos((ua * ub).sum(-1, keepdim=True).clamp(-1, 1))
    shared = (torch.sin(theta / 2) * ua + torch.sin(theta / 2) * ub) / torch.sin(theta)
    keep = theta > math.radians(max_angle)
    out = (torch.where(keep, a, na * shared), torch.where(keep, b, nb * shared))
    return tuple(x.to(first.dtype) for x in out)


@torch.no_grad()
def manual_chunked_logits(model, ids: torch.Tensor, plan: Plan, chunks: list[int]) -> torch.Tensor:
    """Logits of a Llama-layout model fed in chunks of these lengths, attention written out by hand.

    Every step attends over what its cache gives back for earlier chunks and over its own keys and values
    of the current chunk; a kv consumer over its source's. After each chunk, merged pairs (`kvmerge:`)
    give back `slerp_restore` of their two layers' keys and values, others their exact ones."""
    base = model.model
    batch = ids.shape[0]
    sources = plan.kv_source_steps
    where = {s.layer: i for i, s in enumerate(plan.steps)}
    pairs = [(where[a], where[b], angle) for a, b, angle in plan.merge]
    past: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    out, start = [], 0
    for length in chunks:
        h = base.embed_tokens(ids[:, start:start + length])
        cos, sin = base.rotary_emb(h, torch.arange(start, start + length)[None])
        allowed = torch.arange(start + length)[None, :] <= torch.arange(start, start + length)[:, None]
        mask = torch.where(allowed, 0.0, torch.finfo(h.dtype).min)[None, None]
        new, used = {}, {}
        for i, step in enumerate(plan.steps):
            layer = base.layers[step.layer]
            if step.attention:
                att = layer.self_attn
                x = layer.input_layernorm(h)
                heads = functools.partial(_heads, shape=(batch, length, -1, att.head_dim))
                q = _rotate(heads(att.q_proj(x)), cos, sin)
                if sources[i] is None:
                    new[i] = (_rotate(heads(att.k_proj(x)), cos, sin), heads(att.v_proj(x)))
                    used[i] = tuple(torch.cat([p, n], dim=-2) for p, n in zip(past[i], new[i], strict=True)) \
                        if i in past else new[i]
                k, v = used[i if sources[i] is None else sources[i]]
                groups = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
                scores = q @ k.transpose(-1, -2) * att.scaling + mask
                h = h + att.o_proj((torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(batch, length, -1))
            if step.mlp:
                h = h + layer.mlp(layer.post_attention_layernorm(h))
        stored = dict(new)
        for first, second, angle in pairs:
            (ka, kb), (va, vb) = (slerp_restore(new[first][n], new[second][n], angle) for n in (0, 1))
            stored[first], stored[second] = (ka, va), (kb, vb)
        for i, kv in stored.items():
            past[i] = tuple(torch.cat([p, n], dim=-2) for p, n in zip(past[i], kv, strict=True)) if i in past else kv
        out.append(model.lm_head(base.norm(h)))
        start += length
    return torch.cat(out, dim=1)
