"""Routing over a library of trained LoRA adapters: Arrow and PHATGOOSE.

A library (`peft.library`) is a list of adapter directories written by `jaxlm.peft.save_adapter`,
trained on the same base and adapting the same weights (ranks may differ). Routing loads it as
one bank per adapted weight (`modules.LoRA` with N adapters, ranks zero-padded to the largest:
exact) whose `Router` chooses per token, from the layer's input x, which adapters apply:

    y = x W + sum_n g_n(x) s_n (x A_n) B_n,   g(x) = softmax over the top-k logits_n(x)

with k = `peft.library_top_k`. Each adapted weight routes on its own input, layer by layer.

  arrow            Arrow (Ostapenko et al. 2024, arXiv 2405.11157), training-free. Adapter n's
                   prototype p_n is the unit vector of input space its delta amplifies most: the
                   top right singular vector of B A in PyTorch's [out, in] convention, i.e. here
                   the top left singular vector of A B viewed as [prod(fan_in), prod(fan_out)].
                   `arrow_prototypes` gets it without forming the delta: A = Q_a R_a, B^T = Q_b R_b,
                   so A B = Q_a (R_a R_b^T) Q_b^T and p = Q_a u_1 with u_1 the top left singular
                   vector of the R x R core; per stack index (scanned layers keep their layer
                   axis). logits_n = |<x, p_n>| (a singular vector's sign is arbitrary), no
                   normalisation of x, temperature 1: the authors' mttl code (ArrowSelector,
                   arrow_transform: untied, unscaled prototypes) and HF PEFT agree on this.
  phatgoose_gates  PHATGOOSE, step 1 (Muqeeth et al. 2024, arXiv 2402.05859): the one adapter of
                   `peft.library` (a LoRA directory) frozen, its output scaled per token by
                   sigmoid(<x, v>), and only the gate vector v of each adapted weight trained,
                   on the adapter's own data for a few steps (the authors: 100). v starts at zero
                   (sigmoid = 1/2), as in the authors' code (`expert_input_gate = zeros`); they
                   scale the adapter's input by the gate, the same thing for a linear adapter.
                   Held as a bank of one with a "sigmoid" router, the adapter's scale s folded
                   into B (the bank's scale is 1), so `save_adapter` writes A, s B and v
                   (`.../router`): a self-describing library entry.
  phatgoose        PHATGOOSE, step 2: route over a library of such gated adapters: logits_n =
                   <LN(x), LN(v_n)> / sqrt(d), LN a layer norm without affine parameters over the
                   d input features (`Router` kind "phatgoose"), top-2 in the paper. The paper's
                   text says "standardise"; the authors' code (r-three/phatgoose score_type
                   "original", mttl's PhatgooseSelector: norm_d + temperature sqrt(d)) makes it
                   torch's LayerNorm, eps 1e-5 inside the square root, which is what we do.

Nothing is trainable under `arrow` and `phatgoose` (the trainer refuses them): they are for
evaluation and generation on a base model, `jaxlm.peft.apply(model, PeftConfig(method="arrow",
library=dirs))`; no training run is involved. `peft.targets`, `rank` and `alpha` are ignored by
the three methods: the library's adapters define them. Weights with expert axes (routed or soft
MoE experts) cannot be library-routed (their banks take gates from the MoE's dispatch).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from jaxlm.config import PeftConfig, from_dict
from jaxlm.errors import ConfigError
from jaxlm.layers.linear import fan_in_of
from jaxlm.peft import targets as tg
from jaxlm.peft.lifecycle import check_shapes, read_adapter, set_array
from jaxlm.peft.methods import METHODS, Method, lora_scale
from jaxlm.peft.modules import AdapterParam, LoRA

# -- Arrow's prototypes -----------------------------------------------------------------------


def arrow_prototypes(a: np.ndarray, b: np.ndarray, n_in: int) -> np.ndarray:
  """Unit top left singular vectors of A B per stack index, sign fixed (largest entry > 0).

  a [*stack, *fan_in, R], b [*stack, R, *fan_out] -> [*stack, *fan_in] float32; computed in
  float64 from QR(A), QR(B^T) and the SVD of the R x R core, never forming A B.
  """
  r = a.shape[-1]
  stack = a.shape[: a.ndim - n_in - 1]
  fan_in = a.shape[len(stack) : -1]
  a_sir = np.asarray(a, np.float64).reshape((-1, math.prod(fan_in), r))
  b_sor = np.swapaxes(np.asarray(b, np.float64).reshape((a_sir.shape[0], r, -1)), -1, -2)
  q_a, r_a = np.linalg.qr(a_sir)
  _, r_b = np.linalg.qr(b_sor)
  u, _, _ = np.linalg.svd(r_a @ np.swapaxes(r_b, -1, -2))
  p = np.einsum("sir,sr->si", q_a, u[..., :, 0])
  top = np.take_along_axis(p, np.argmax(np.abs(p), -1)[:, None], -1)
  p = p * np.where(top < 0, -1.0, 1.0)
  return p.reshape(stack + fan_in).astype(np.float32)


# -- reading a library --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Site:
  """A base weight the library adapts: its path and axis counts."""

  path: tuple[Any, ...]
  var: nnx.Param
  n_scan: int  # leading layer axes of scanned layers
  n_stack: int  # all stack axes (here = n_scan: expert weights are refused)
  n_in: int


@dataclasses.dataclass(frozen=True)
class Entry:
  """One library adapter, by weight path: A [*stack, *fan_in, R], B [*stack, R, *fan_out] (no
  bank axis), its scale s and its PHATGOOSE gate vector [*stack, *fan_in] (None for plain LoRA)."""

  name: str
  a: dict[str, np.ndarray]
  b: dict[str, np.ndarray]
  scale: dict[str, float]
  gate: dict[str, np.ndarray | None]


def _sites(model: nnx.Module, paths: Sequence[str], who: str) -> dict[str, Site]:
  base = {name: (path, var) for name, path, var in tg.linear_weights(model)}
  out = {}
  for p in paths:
    if p not in base:
      raise ConfigError(f"peft.method={who!r}: {p} is adapted already; apply it to the base model")
    path, var = base[p]
    fan_in = fan_in_of(var)
    n_in, n_out, n_scan = len(fan_in), -fan_in[-1] - 1, tg.n_scan(path)
    n_stack = var.ndim - n_in - n_out
    if n_stack != n_scan:
      raise ConfigError(f"peft.method={who!r}: {p} is a stack of experts; library routing adapts dense weights only")
    out[p] = Site(path, var, n_scan, n_stack, n_in)
  order = {name: i for i, name in enumerate(base)}
  return dict(sorted(out.items(), key=lambda kv: order[kv[0]]))


def read_library(model: nnx.Module, directories: Sequence[str | Path], *, method: str, who: str) -> tuple[dict[str, Site], list[Entry]]:
  """The sites (base weights, in model order) and entries of a library whose adapters are all
  of `method` ("lora", or "phatgoose_gates" for gated entries) and adapt the same weights."""
  sites: dict[str, Site] | None = None
  entries = []
  for d in map(Path, directories):
    meta, values = read_adapter(d)
    got = meta["peft"]["method"]
    if got != method:
      raise ConfigError(f"peft.method={who!r} needs {method!r} adapters, but library entry {d} is a {got!r} adapter")
    cfg = from_dict(PeftConfig, meta["peft"])
    if cfg.n_experts:
      raise ConfigError(f"peft.method={who!r}: library entry {d} is a mixture of LoRA experts, not one adapter")
    check_shapes(model, meta, d)
    paths = sorted(meta["adapted_shapes"])
    if sites is None:
      sites = _sites(model, paths, who)
    elif set(paths) != set(sites):
      raise ConfigError(f"peft.method={who!r}: library entry {d} adapts other weights than {directories[0]}; a library needs the same targets")
    a, b, scale, gate = {}, {}, {}, {}
    for p, site in sites.items():
      try:
        a[p], b[p] = values[f"{p}/a"], values[f"{p}/b"]
        gate[p] = values[f"{p}/router"] if method == "phatgoose_gates" else None
      except KeyError:
        raise ConfigError(f"peft.method={who!r}: library entry {d} lacks the {'a, b and router' if method == 'phatgoose_gates' else 'a and b'} weights of {p}") from None
      if method == "phatgoose_gates":  # a bank of one, its scale folded into B
        a[p], b[p] = np.squeeze(a[p], site.n_stack), np.squeeze(b[p], site.n_stack)
        gate[p], scale[p] = np.squeeze(gate[p], site.n_scan), 1.0
      else:
        scale[p] = lora_scale(cfg, a[p].shape[-1], tg.first_match(cfg.alpha_pattern, p, cfg.alpha))
    entries.append(Entry(str(d), a, b, scale, gate))
  return sites or {}, entries


def _pad_rank(x: np.ndarray, r: int, axis: int) -> np.ndarray:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, r - x.shape[axis])
  return np.pad(x, pad)


def attach_bank(model: nnx.Module, sites: dict[str, Site], entries: list[Entry], *, router: str, top_k: int, key: jax.Array, router_weights=None) -> nnx.Module:
  """Replace every site by a `LoRA` bank of `entries` with a `router` of that kind (in place);
  `router_weights(path, site) -> [*scan, N, *fan_in]` fills the router (None: its zero init)."""
  for (p, site), k in zip(sites.items(), jax.random.split(key, max(len(sites), 1))):
    r = max(e.a[p].shape[-1] for e in entries)
    mod = LoRA(site.var, rank=r, scale=tuple(e.scale[p] for e in entries), key=k, bank=len(entries), names=tuple(e.name for e in entries), router=router, top_k=top_k, n_scan=site.n_scan)
    if not isinstance(site.var.get_value(), jax.ShapeDtypeStruct):  # abstract models get shapes only
      s = site.n_stack
      set_array(mod.a, np.stack([_pad_rank(e.a[p], r, -1) for e in entries], axis=s), f"{p}/a")
      set_array(mod.b, np.stack([_pad_rank(e.b[p], r, s) for e in entries], axis=s), f"{p}/b")
      if router_weights is not None:
        set_array(mod.router, router_weights(p, site), f"{p}/router")
    tg.set_node(model, site.path, mod)
  return model


# -- the methods ------------------------------------------------------------------------------


def _arrow(model: nnx.Module, cfg: PeftConfig, key: jax.Array, **_: Any) -> nnx.Module:
  sites, entries = read_library(model, cfg.library, method="lora", who="arrow")
  protos = lambda p, site: np.stack([arrow_prototypes(e.a[p], e.b[p], site.n_in) for e in entries], axis=site.n_scan)
  return attach_bank(model, sites, entries, router="arrow", top_k=cfg.library_top_k, key=key, router_weights=protos)


def _phatgoose_gates(model: nnx.Module, cfg: PeftConfig, key: jax.Array, **_: Any) -> nnx.Module:
  sites, (entry,) = read_library(model, cfg.library, method="lora", who="phatgoose_gates")
  folded = dataclasses.replace(entry, b={p: b * np.asarray(entry.scale[p], b.dtype) for p, b in entry.b.items()}, scale={p: 1.0 for p in entry.scale})
  return attach_bank(model, sites, [folded], router="sigmoid", top_k=0, key=key)


def _phatgoose(model: nnx.Module, cfg: PeftConfig, key: jax.Array, **_: Any) -> nnx.Module:
  sites, entries = read_library(model, cfg.library, method="phatgoose_gates", who="phatgoose")
  gates = lambda p, site: np.stack([e.gate[p] for e in entries], axis=site.n_scan)
  return attach_bank(model, sites, entries, router="phatgoose", top_k=cfg.library_top_k, key=key, router_weights=gates)


def is_gate(path: tuple[Any, ...], v: nnx.Variable) -> bool:
  """PHATGOOSE's gate vectors: the routers of the adapted weights."""
  return isinstance(v, AdapterParam) and bool(path) and path[-1] == "router"


METHODS.register("arrow", Method(_arrow, lambda path, v: False))
METHODS.register("phatgoose_gates", Method(_phatgoose_gates, is_gate))
METHODS.register("phatgoose", Method(_phatgoose, lambda path, v: False))
