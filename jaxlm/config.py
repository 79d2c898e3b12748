"""Typed, frozen configuration: one `Experiment` tree, validated when it is built.

Every field has a one-line comment. Validation lives in `__post_init__`, so an invalid config
cannot exist (also not after `dataclasses.replace` or a `--set` override); the error names the
field by its dotted path, and the CLI prints it as one line with exit code 2.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from jaxlm.errors import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh: one axis per kind of parallelism. -1 fills with the devices left over."""

  data: int = 1  # pure data parallelism (replicated params)
  fsdp: int = -1  # data parallelism with params and optimizer state sharded (ZeRO-3)
  expert: int = 1  # expert parallelism (MoE experts sharded; batch too for non-MoE layers)
  tensor: int = 1  # tensor (model) parallelism over heads / mlp / vocab
  dcn_data: int = 1  # multi-slice: data-parallel size across slices (over DCN)
  dcn_fsdp: int = 1  # multi-slice: fsdp size across slices
  dcn_expert: int = 1  # multi-slice: expert size across slices
  dcn_tensor: int = 1  # multi-slice: tensor size across slices (rarely useful)
  rules: tuple[tuple[str, Any], ...] = ()  # overrides of the logical->mesh rule table
  devices: int = 0  # devices this experiment is written for (0: whatever is present)

  def __post_init__(self):
    ici = [getattr(self, a) for a in MESH_AXES]
    _check(all(s == -1 or s >= 1 for s in ici), f"mesh: axis sizes must be >= 1 or -1, got {dict(zip(MESH_AXES, ici))}")
    _check(sum(s == -1 for s in ici) <= 1, "mesh: at most one axis may be -1")
    for a in MESH_AXES:
      _check(getattr(self, f"dcn_{a}") >= 1, f"mesh.dcn_{a} must be >= 1")
    _check(self.devices >= 0, "mesh.devices must be >= 0")

  @property
  def dcn_shape(self) -> tuple[int, ...]:
    return tuple(getattr(self, f"dcn_{a}") for a in MESH_AXES)

  def shape(self, n_devices: int) -> dict[str, int]:
    """Resolved sizes (ici x dcn) of every mesh axis for `n_devices` devices."""
    n_slices = math.prod(self.dcn_shape)
    _check(n_devices % n_slices == 0, f"mesh: {n_devices} devices cannot form {n_slices} slices (dcn_* sizes)")
    per_slice = n_devices // n_slices
    ici = {a: getattr(self, a) for a in MESH_AXES}
    known = math.prod(s for s in ici.values() if s != -1)
    fill = [a for a, s in ici.items() if s == -1]
    if fill:
      _check(per_slice % known == 0, f"mesh: {per_slice} devices per slice are not divisible by the fixed axes {ici}")
      ici[fill[0]] = per_slice // known
    _check(
        math.prod(ici.values()) == per_slice,
        f"mesh: data*fsdp*expert*tensor = {math.prod(ici.values())} but there are {per_slice} devices"
        + (" per slice" if n_slices > 1 else "")
        + f" ({ici})",
    )
    return {a: ici[a] * getattr(self, f"dcn_{a}") for a in MESH_AXES}


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Token-level sparse mixture of experts (the `moe` FFN kind)."""

  n_experts: int = 8  # routed experts E
  top_k: int = 2  # experts per token (expert_choice: average experts per token)
  d_ff_expert: int = 0  # hidden size of each expert (0: model.d_ff); small values = fine-grained experts
  n_shared_experts: int = 0  # always-on experts (DeepSeekMoE), each of size d_ff_expert
  d_ff_shared: int = 0  # hidden width of the shared experts together (0: n_shared_experts * d_ff_expert; Qwen2-MoE sets its own)
  shared_gate: bool = False  # Qwen2-MoE: scale the shared experts' output by sigmoid(x w_shared_gate), w_shared_gate [D, 1]
  router: str = "softmax_topk"  # routing function: softmax_topk, sigmoid_bias (DeepSeek-V3), expert_choice or hard_topk (EMoE: top-k, weight 1 each)
  router_from_keys: bool = False  # EMoE avg-k gating: route by each expert's mean w_gate column, recomputed from the current experts (no router parameter)
  renormalize: bool = True  # renormalise the k chosen weights to sum to 1
  route_scale: float = 1.0  # multiplier of the combine weights (DeepSeek-V3: 2.5)
  jitter: float = 0.0  # multiplicative router-input jitter in training (Switch): x * U(1-eps, 1+eps)
  mode: str = "dropless"  # "dropless" or "capacity" (fixed slots per expert and sequence, overflow dropped)
  capacity_factor: float = 1.25  # capacity mode and expert_choice: slots = ceil(cf * seq_len * top_k / E)
  gmm_backend: str = "auto"  # grouped matmul: ragged_dot, capacity_einsum, pallas, or auto (per platform)
  block_rows: int = 0  # capacity_einsum in dropless mode: rows per expert block (0: auto)
  all_to_all: str = "auto"  # expert-parallel exchange: ragged, padded, or auto (ragged on TPU/GPU)
  load_balance_weight: float = 0.01  # Switch load-balancing loss weight
  router_z_weight: float = 0.001  # router z-loss weight
  bias_update_rate: float = 0.001  # DeepSeek-V3 selection-bias update rate (sigmoid_bias router)
  allow_noncausal_routing: bool = False  # opt in to expert-choice routing in a causal decoder
  gw_threshold: float = 0.0  # GW-MoE fine-tuning: broadcast tokens whose router entropy / log E >= this to every expert, in training only (0: off)
  gw_slots: int = 0  # GW-MoE: broadcast at most this many uncertain tokens per sequence, the first ones (0: no cap)

  def __post_init__(self):
    _check(self.n_experts >= 1, "model.moe.n_experts must be >= 1")
    _check(1 <= self.top_k <= self.n_experts, f"model.moe.top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}")
    _check(self.d_ff_expert >= 0, "model.moe.d_ff_expert must be >= 0")
    _check(self.n_shared_experts >= 0, "model.moe.n_shared_experts must be >= 0")
    _check(self.d_ff_shared >= 0, f"model.moe.d_ff_shared must be >= 0, got {self.d_ff_shared}")
    _check(not (self.d_ff_shared or self.shared_gate) or self.n_shared_experts >= 1, "model.moe.d_ff_shared and model.moe.shared_gate need model.moe.n_shared_experts >= 1")
    routers = ("softmax_topk", "sigmoid_bias", "expert_choice", "hard_topk")
    _check(self.router in routers, f"model.moe.router must be one of {routers}, got {self.router!r}")
    _check(self.route_scale > 0, f"model.moe.route_scale must be > 0, got {self.route_scale}")
    _check(0 <= self.jitter < 1, f"model.moe.jitter must be in [0, 1), got {self.jitter}")
    _check(self.mode in ("dropless", "capacity"), f"model.moe.mode must be 'dropless' or 'capacity', got {self.mode!r}")
    if self.mode == "capacity" or self.router == "expert_choice":
      why = "model.moe.mode='capacity'" if self.mode == "capacity" else "model.moe.router='expert_choice'"
      _check(self.capacity_factor > 0, f"model.moe.capacity_factor must be > 0 with {why}, got {self.capacity_factor}")
    backends = ("auto", "ragged_dot", "capacity_einsum", "pallas")
    _check(self.gmm_backend in backends, f"model.moe.gmm_backend must be one of {backends}, got {self.gmm_backend!r}")
    _check(self.block_rows >= 0, f"model.moe.block_rows must be >= 0, got {self.block_rows}")
    _check(self.all_to_all in ("auto", "ragged", "padded"), f"model.moe.all_to_all must be auto, ragged or padded, got {self.all_to_all!r}")
    for f in ("load_balance_weight", "router_z_weight", "bias_update_rate"):
      _check(getattr(self, f) >= 0, f"model.moe.{f} must be >= 0, got {getattr(self, f)}")
    _check(
        self.router != "expert_choice" or self.allow_noncausal_routing,
        "model.moe.router='expert_choice' lets a token's routing depend on later tokens of its sequence, which a causal "
        "decoder must not do; set model.moe.allow_noncausal_routing=true to opt in",
    )
    _check(0 <= self.gw_threshold < 1, f"model.moe.gw_threshold is a fraction of the largest router entropy log E: must be in (0, 1), or 0 for off, got {self.gw_threshold}")
    _check(self.gw_slots >= 0, f"model.moe.gw_slots must be >= 0, got {self.gw_slots}")
    _check(not self.gw_threshold or self.router in ("softmax_topk", "sigmoid_bias"), f"model.moe.gw_threshold (GW-MoE) sends an uncertain token to every expert, weighted by its router probabilities, instead of its top-k: it needs router softmax_topk or sigmoid_bias, not {self.router!r}")


@dataclasses.dataclass(frozen=True)
class SoftMoEConfig:
  """Soft-merged mixture of experts (the `soft_moe` FFN kind): SMEAR and Lory."""

  n_experts: int = 8  # experts E, merged in parameter space
  granularity: str = "segment"  # "segment" (Lory, causal) or "sequence" (SMEAR, reads the whole sequence)
  segment_len: int = 256  # T: tokens per routing segment (granularity="segment")
  first_segment: str = "paper"  # routing of segment 1: "paper" (own mean, stop-gradient) or "uniform"
  allow_noncausal_routing: bool = False  # opt in to sequence-level routing in a causal decoder
  expert_dropout: float = 0.0  # SMEAR expert dropout: zero each routing weight w.p. p, renormalise
  merge: str = "auto"  # merge implementation (registry key): einsum, pallas, or auto
  dense_warmup: float = 0.0  # fraction of steps trained dense before the FFN is copied into every expert
  extra_segments: int = 1  # packed rows: routing segments beyond seq_len / T kept for document boundaries
  merge_chunk: int = 0  # segments of a row merged per scan step (0: a quarter of them); transient memory ~ chunk x 3 x D x F
  decode_routing: str = "prompt"  # generation: "prompt" (route once on the prompt) or "segments" (re-route every T tokens)

  def __post_init__(self):
    _check(self.n_experts >= 1, f"model.soft_moe.n_experts must be >= 1, got {self.n_experts}")
    _check(self.granularity in ("segment", "sequence"), f"model.soft_moe.granularity must be 'segment' or 'sequence', got {self.granularity!r}")
    _check(self.segment_len >= 1, f"model.soft_moe.segment_len must be >= 1, got {self.segment_len}")
    _check(self.first_segment in ("paper", "uniform"), f"model.soft_moe.first_segment must be 'paper' or 'uniform', got {self.first_segment!r}")
    _check(0 <= self.expert_dropout < 1, f"model.soft_moe.expert_dropout must be in [0, 1), got {self.expert_dropout}")
    _check(0 <= self.dense_warmup < 1, f"model.soft_moe.dense_warmup must be in [0, 1), got {self.dense_warmup}")
    _check(self.extra_segments >= 0, f"model.soft_moe.extra_segments must be >= 0, got {self.extra_segments}")
    _check(self.merge_chunk >= 0, f"model.soft_moe.merge_chunk must be >= 0, got {self.merge_chunk}")
    _check(self.decode_routing in ("prompt", "segments"), f"model.soft_moe.decode_routing must be 'prompt' or 'segments', got {self.decode_routing!r}")
    _check(
        self.granularity != "sequence" or self.allow_noncausal_routing,
        "model.soft_moe.granularity='sequence' (SMEAR) routes every token on the mean of its whole sequence, future tokens "
        "included, which a causal decoder must not do; set model.soft_moe.allow_noncausal_routing=true to opt in",
    )
    _check(
        self.granularity != "sequence" or self.decode_routing == "prompt",
        "model.soft_moe.decode_routing='segments' needs granularity='segment' (a sequence-level router has no segments)",
    )


@dataclasses.dataclass(frozen=True)
class HyperMoEConfig:
  """HyperMoE (Zhao et al. 2024, arXiv 2402.12656), the `hypermoe` FFN kind: the sparse MoE of
  model.moe plus, per token, a HyperExpert whose weights a hypernetwork generates from the
  embeddings of the experts the token did not select (jaxlm.layers.moe.hyper)."""

  expert_dim: int = 64  # width of each expert's learned embedding (the paper's code: 128)
  process_dim: int = 64  # hidden width of the MLP over the summed embeddings of the unselected experts (the paper's code: 128)
  hyper_dim: int = 32  # hidden units of the hypernetwork whose linear heads emit the HyperExpert's weights (the paper's code: 128)
  adapter_dim: int = 16  # bottleneck of the HyperExpert, a ReLU adapter D -> adapter_dim -> D (the paper's code: 64)

  def __post_init__(self):
    for f in ("expert_dim", "process_dim", "hyper_dim", "adapter_dim"):
      _check(getattr(self, f) >= 1, f"model.hypermoe.{f} must be >= 1, got {getattr(self, f)}")


QK_NORMS = ("none", "head", "proj")
ROPE_SCALINGS = ("none", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Variants of self-attention that the Hugging Face families use (jaxlm.layers.attention)."""

  qkv_bias: bool = False  # a learned bias on the q, k and v projections (Qwen2, Qwen2-MoE)
  qk_norm: str = "none"  # RMSNorm of queries and keys before RoPE: none, head (over each head's K: Qwen3), proj (over the whole projection before the head split: OLMoE)
  clip_qkv: float = 0.0  # clamp the q, k, v projections to [-c, c] (OLMoE; 0: off)
  sliding_window: int = 0  # a query sees only keys fewer than this many positions back (Mistral; 0: all earlier keys)

  def __post_init__(self):
    _check(self.qk_norm in QK_NORMS, f"model.attention.qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
    _check(self.clip_qkv >= 0, f"model.attention.clip_qkv must be >= 0, got {self.clip_qkv}")
    _check(self.sliding_window >= 0, f"model.attention.sliding_window must be >= 0, got {self.sliding_window}")


@dataclasses.dataclass(frozen=True)
class RopeScalingConfig:
  """Rescaling of the RoPE frequencies for long contexts (jaxlm.layers.rope registry)."""

  kind: str = "none"  # none, linear (positions / factor), llama3 (Llama 3.1's per-frequency interpolation)
  factor: float = 1.0  # context extension factor
  low_freq_factor: float = 1.0  # llama3: wavelengths above original_max_len / low_freq_factor are divided by factor
  high_freq_factor: float = 4.0  # llama3: wavelengths below original_max_len / high_freq_factor are kept
  original_max_len: int = 8192  # llama3: the context length the model was pre-trained with

  def __post_init__(self):
    _check(self.kind in ROPE_SCALINGS, f"model.rope_scaling.kind must be one of {ROPE_SCALINGS}, got {self.kind!r}")
    _check(self.factor > 0, f"model.rope_scaling.factor must be > 0, got {self.factor}")
    if self.kind == "llama3":
      _check(
          0 < self.low_freq_factor < self.high_freq_factor,
          f"model.rope_scaling: llama3 needs 0 < low_freq_factor < high_freq_factor, got {self.low_freq_factor}, {self.high_freq_factor}",
      )
      _check(self.original_max_len >= 1, f"model.rope_scaling.original_max_len must be >= 1, got {self.original_max_len}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama-style decoder; the FFN of every layer comes from the FFN registry."""

  vocab_size: int = 384  # embedding rows (>= the tokenizer's vocabulary; multiples of 128 are fastest)
  d_model: int = 256  # D: residual stream width
  n_layers: int = 4  # decoder blocks
  n_heads: int = 4  # H: query heads
  n_kv_heads: int = 4  # key/value heads (grouped-query attention when < n_heads)
  head_dim: int = 0  # K: per-head width (0: d_model // n_heads)
  d_ff: int = 768  # F: hidden width of the dense SwiGLU MLP
  ffn: str = "dense"  # FFN kind (registry key) used where the pattern below places it
  first_k_dense: int = 0  # the first k layers use the dense MLP whatever `ffn` is (DeepSeek)
  ffn_every: int = 1  # after those, every n-th layer uses `ffn`, the others dense (Switch: 2)
  rope_theta: float = 10_000.0  # RoPE base frequency
  rope_scaling: RopeScalingConfig = RopeScalingConfig()  # long-context rescaling of the RoPE frequencies
  attention: AttentionConfig = AttentionConfig()  # attention variants (biases, q/k norms, sliding window)
  norm_eps: float = 1e-5  # RMSNorm epsilon
  tie_embeddings: bool = True  # share the embedding matrix with the output head
  dtype: str = "bfloat16"  # compute dtype of activations and matmuls
  param_dtype: str = "float32"  # master weights
  init_std: float = 0.02  # std of the normal init of weight matrices (output projections scaled by depth)
  remat: str = "none"  # activation checkpointing per block: none, full, dots, dots_no_batch
  scan_layers: bool = False  # scan over identical blocks (fast compiles for deep models)
  attention_impl: str = "xla"  # jax.nn.dot_product_attention implementation: xla, cudnn, or auto
  moe: MoEConfig = MoEConfig()  # settings of the `moe` FFN kind
  soft_moe: SoftMoEConfig = SoftMoEConfig()  # settings of the `soft_moe` FFN kind
  hypermoe: HyperMoEConfig = HyperMoEConfig()  # settings of the `hypermoe` FFN kind (its sparse MoE: model.moe)

  def __post_init__(self):
    for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "ffn_every"):
      _check(getattr(self, f) >= 1, f"model.{f} must be >= 1, got {getattr(self, f)}")
    _check(
        self.n_heads % self.n_kv_heads == 0,
        f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads})",
    )
    _check(self.head_dim > 0 or self.d_model % self.n_heads == 0, f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads}) unless model.head_dim is set")
    _check(self.head_dim >= 0 and self.head_dim % 2 == 0, f"model.head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
    _check(self.resolved_head_dim % 2 == 0, f"head_dim = d_model / n_heads = {self.resolved_head_dim} must be even (RoPE rotates pairs)")
    _check(0 <= self.first_k_dense <= self.n_layers, f"model.first_k_dense must be in [0, n_layers], got {self.first_k_dense}")
    _check(self.dtype in DTYPES, f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")
    _check(self.param_dtype in DTYPES, f"model.param_dtype must be one of {DTYPES}, got {self.param_dtype!r}")
    _check(self.remat in REMAT_POLICIES, f"model.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    _check(self.attention_impl in ("xla", "cudnn", "auto"), f"model.attention_impl must be xla, cudnn or auto, got {self.attention_impl!r}")
    if self.scan_layers:
      period = self.ffn_every
      _check(
          (self.n_layers - self.first_k_dense) % period == 0,
          f"model.scan_layers needs (n_layers - first_k_dense) = {self.n_layers - self.first_k_dense} divisible by ffn_every = {period}",
      )

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def n_units(self) -> int:
    """Repeats of the `ffn_every`-layer unit after the dense prefix (stacked with scan_layers)."""
    return (self.n_layers - self.first_k_dense) // self.ffn_every

  def layer_ffn(self, i: int) -> str:
    """FFN kind of layer i: dense for the first k layers, then `ffn` on every n-th layer."""
    if i < self.first_k_dense:
      return "dense"
    return self.ffn if (i - self.first_k_dense) % self.ffn_every == 0 else "dense"

  @property
  def ffn_kinds(self) -> tuple[str, ...]:
    return tuple(self.layer_ffn(i) for i in range(self.n_layers))


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Sources, mixture, tokenizer and packing. Batches are global: split over hosts and devices."""

  mixture: Mapping[str, float] = dataclasses.field(default_factory=lambda: {"stdlib_prose": 0.5, "stdlib_code": 0.5})  # {source: weight}: shares of training tokens (sources: jaxlm.data.sources)
  stages: tuple[tuple[int, Mapping[str, float]], ...] = ()  # ((step, {source: weight}), ...): after `step` optimizer steps these weights replace the previous ones (sources from data.mixture; one left out gets 0)
  eval_also: tuple[str, ...] = ()  # sources evaluated (eval_loss/<source>, and in eval_loss) besides those trained on, never trained on: e.g. an earlier fine-tuning stage's data, to measure forgetting
  seq_len: int = 256  # tokens per packed sequence
  batch_size: int = 16  # global batch in sequences (per optimizer step, before gradient accumulation split)
  tokenizer: str = "byte"  # tokenizer kind (jaxlm.data.tokenizers registry): byte, sentencepiece or hf
  sp_model: str = ""  # sentencepiece .model file; empty: train one on the training data into the run dir
  tokenizer_path: str = ""  # hf: a tokenizer.json or a Hugging Face model directory holding one, special tokens from the JSON files beside it (empty: init_from, when that is an HF model directory)
  sp_vocab_size: int = 1024  # vocabulary of a sentencepiece model trained on the data
  add_bos: bool = True  # prepend BOS to every document
  shuffle: bool = True  # shuffle documents (deterministically, from train.seed)
  cache_dir: str = ""  # where built datasets live (empty: $JAXLM_CACHE or ~/.cache/jaxlm)
  similarity: str = "none"  # training order: "none" (shuffled) or nearest-neighbour chains (In-Context Pretraining) by "exact", "lsh" or "auto" search
  similarity_neighbors: int = 8  # neighbours searched per document for the similarity order
  workers: int = 0  # processes per host that read and tokenize training documents (jaxlm.data.workers); 0: the training process; the batches are the same for any number

  def __post_init__(self):
    _check(isinstance(self.mixture, Mapping) and len(self.mixture) > 0, "data.mixture must be a non-empty {source: weight} mapping")
    for k, w in self.mixture.items():
      _check(isinstance(w, (int, float)) and w >= 0, f"data.mixture[{k!r}] must be a weight >= 0, got {w!r}")
    _check(sum(self.mixture.values()) > 0, "data.mixture weights must not all be 0")
    object.__setattr__(self, "stages", self._checked_stages())
    _check(isinstance(self.eval_also, tuple) and all(isinstance(n, str) and n for n in self.eval_also), f"data.eval_also must be a tuple of source names, got {self.eval_also!r}")
    _check(self.seq_len >= 2, f"data.seq_len must be >= 2, got {self.seq_len}")
    _check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
    from jaxlm.data.tokenizers import TOKENIZERS

    TOKENIZERS.get(self.tokenizer).validate(self)
    _check(self.similarity in ("none", "exact", "lsh", "auto"), f"data.similarity must be none, exact, lsh or auto, got {self.similarity!r}")
    _check(self.similarity_neighbors >= 1, f"data.similarity_neighbors must be >= 1, got {self.similarity_neighbors}")
    _check(isinstance(self.workers, int) and not isinstance(self.workers, bool) and 0 <= self.workers <= 256, f"data.workers must be an integer from 0 to 256, got {self.workers!r}")

  def _checked_stages(self) -> tuple[tuple[int, dict[str, float]], ...]:
    """data.stages as ((step, {source: weight}), ...), steps increasing from 1 (lists accepted)."""
    _check(isinstance(self.stages, (tuple, list)), f"data.stages must be a tuple of (step, {{source: weight}}) pairs, got {self.stages!r}")
    out, last = [], 0
    for i, stage in enumerate(self.stages):
      where = f"data.stages[{i}]"
      _check(isinstance(stage, (tuple, list)) and len(stage) == 2, f"{where} must be a (step, {{source: weight}}) pair, got {stage!r}")
      step, weights = stage
      _check(isinstance(step, int) and not isinstance(step, bool) and step > last, f"{where}: the step must be an integer > {last} (steps increase), got {step!r}")
      _check(isinstance(weights, Mapping) and len(weights) > 0, f"{where}: the weights must be a non-empty {{source: weight}} mapping, got {weights!r}")
      for k, w in weights.items():
        _check(k in self.mixture, f"{where}: source {k!r} is not in data.mixture ({', '.join(self.mixture)}); add it there (weight 0 until this stage)")
        _check(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0, f"{where}[{k!r}] must be a weight >= 0, got {w!r}")
      _check(sum(weights.values()) > 0, f"{where}: the weights must not all be 0")
      out.append((step, dict(weights)))
      last = step
    return tuple(out)

  def __hash__(self):  # mixture is a dict; hash by value so configs can be compared and cached
    stages = tuple((step, tuple(sorted(w.items()))) for step, w in self.stages)
    return hash((tuple(sorted(self.mixture.items())), stages, self.seq_len, self.batch_size, self.tokenizer, self.sp_model, self.tokenizer_path))


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup and cosine decay, global-norm clipping."""

  lr: float = 3e-3  # peak learning rate
  warmup_steps: int = 50  # linear warmup from 0 to lr
  decay_steps: int = 0  # cosine decay length, warmup included (0: train.steps)
  min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
  b1: float = 0.9  # Adam beta1
  b2: float = 0.95  # Adam beta2
  eps: float = 1e-8  # Adam epsilon
  weight_decay: float = 0.1  # decoupled weight decay (not applied to norms and biases)
  clip_norm: float = 1.0  # global gradient-norm clipping (0: off)
  migu_ratio: float = 0.0  # MIGU (Du et al. 2024, jaxlm.train.migu): per linear layer, update only the weights feeding this share of its outputs, those of largest L1 magnitude (paper: 0.3); 0 or 1: off

  def __post_init__(self):
    _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
    _check(0 <= self.migu_ratio <= 1, f"optim.migu_ratio is the share of each linear layer's outputs MIGU updates: must be in (0, 1], or 0 for off, got {self.migu_ratio}")
    _check(self.warmup_steps >= 0 and self.decay_steps >= 0, "optim.warmup_steps and optim.decay_steps must be >= 0")
    _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]")
    _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optim.b1 and optim.b2 must be in [0, 1)")
    _check(self.weight_decay >= 0 and self.clip_norm >= 0, "optim.weight_decay and optim.clip_norm must be >= 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The loop: steps, evaluation, checkpoints, logging."""

  steps: int = 1000  # optimizer steps
  seed: int = 0  # parameter init and data order
  grad_accum: int = 1  # microbatches per optimizer step (data.batch_size is split into these)
  z_loss_weight: float = 0.0  # weight of mean(logsumexp(logits)^2) (PaLM z-loss)
  loss_chunk: int = 2048  # tokens per device in one chunk of the loss: the float32 logits exist one chunk at a time (0: all at once)
  nonfinite: str = "skip"  # on a NaN/Inf loss or gradient: "skip" the update (counted, logged) or "stop" the run naming the step
  spike_sigma: float = 0.0  # skip an update whose loss exceeds the rolling mean by this many rolling standard deviations (0: off)
  spike_window: int = 100  # steps in the rolling loss mean and deviation; no spike is judged before this many
  eval_every: int = 100  # steps between evaluations (0: only at the end)
  eval_batches: int = 4  # batches per source per evaluation
  checkpoint_every: int = 200  # steps between checkpoints (0: only at the end)
  log_every: int = 10  # steps between metric lines
  sample_prompts: tuple[str, ...] = ("def ", "The ")  # printed with a generated continuation at the end
  sample_tokens: int = 64  # tokens generated per sample prompt

  def __post_init__(self):
    _check(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
    _check(self.grad_accum >= 1, "train.grad_accum must be >= 1")
    for f in ("eval_every", "eval_batches", "checkpoint_every", "sample_tokens", "z_loss_weight", "loss_chunk", "spike_sigma"):
      _check(getattr(self, f) >= 0, f"train.{f} must be >= 0")
    _check(self.log_every >= 1, "train.log_every must be >= 1")
    _check(self.nonfinite in ("skip", "stop"), f"train.nonfinite must be 'skip' or 'stop', got {self.nonfinite!r}")
    _check(self.spike_window >= 1, f"train.spike_window must be >= 1, got {self.spike_window}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpoints of model, optimizer, step and data-iterator state, saved together."""

  enabled: bool = True  # save checkpoints at all
  max_to_keep: int = 3  # newest checkpoints kept
  async_save: bool = True  # write in the background while training continues
  save_on_sigterm: bool = True  # on SIGTERM (preemption): checkpoint at the next step boundary and exit 0
  compression: bool = False  # zstd-compress the arrays (~7% smaller for float weights, ~3x the host CPU of an async save)

  def __post_init__(self):
    _check(self.max_to_keep >= 1, "checkpoint.max_to_keep must be >= 1")


PEFT_METHODS = ("none", "lora", "dora", "ia3", "bitfit", "prompt", "bottleneck", "esft", "arrow", "phatgoose", "phatgoose_gates", "subset")
MIGU_PEFT_METHODS = ("none", "lora", "dora", "subset")  # the PEFT methods whose updates MIGU can mask


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """Parameter-efficient fine-tuning (jaxlm.peft): the method, the weights it adapts, its sizes."""

  method: str = "none"  # none (train every weight), lora, dora, ia3, bitfit, prompt, bottleneck, esft, arrow, phatgoose, phatgoose_gates, subset (train the targets' base weights in full, nothing else)
  targets: tuple[str, ...] = ()  # regexes fully matching parameter paths (e.g. "blocks/.*/attn/w_(q|v)"), "all-linear", "ffn-keys" (every FFN's w_gate, w_up) or "ffn-values" (w_down); routers only when a pattern says "router"; (): the method's default
  rank: int = 8  # LoRA / DoRA rank r
  alpha: float = 16.0  # LoRA scale = alpha / r (alpha / sqrt(r) with rslora)
  rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)
  dropout: float = 0.0  # dropout on the input of the LoRA branch (training only)
  rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)  # {regex: rank} per-target ranks (first full match wins)
  alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)  # {regex: alpha} per-target alphas
  n_experts: int = 0  # a mixture of adapters per target: MoLoRA (lora), MoV (ia3), SMEAR-merged (bottleneck); 0: one adapter
  top_k: int = 0  # mixture routing per token: experts kept (0: soft, all of them)
  prompt_len: int = 20  # prompt tuning: virtual tokens before every sequence
  bottleneck_dim: int = 64  # bottleneck adapters (Houlsby): hidden width
  bottleneck_at: tuple[str, ...] = ("attn", "ffn")  # bottleneck adapters: after these sublayers of every block
  esft_score: str = "gate"  # ESFT: expert relevance by mean gate affinity ("gate") or selection ratio ("token")
  esft_top_p: float = 0.2  # ESFT: per layer, the top experts whose cumulative relevance reaches this share
  esft_batches: int = 8  # ESFT: training batches scored to choose the experts
  library: tuple[str, ...] = ()  # arrow / phatgoose: adapter directories routed over (phatgoose_gates: the one adapter gated)
  library_top_k: int = 2  # arrow / phatgoose: adapters per token
  train_also: tuple[str, ...] = ()  # regexes of base parameters trained too (HF PEFT's modules_to_save), e.g. ".*norm.*"
  allow_noncausal_routing: bool = False  # opt in to SMEAR-merged bottleneck experts routed on a whole sequence

  def __post_init__(self):
    _check(self.method in PEFT_METHODS, f"peft.method must be one of {', '.join(PEFT_METHODS)}; got {self.method!r}")
    _check(isinstance(self.targets, tuple) and all(isinstance(t, str) and t for t in self.targets), f"peft.targets must be a tuple of regexes, got {self.targets!r}")
    _check(self.method != "subset" or bool(self.targets), "peft.method='subset' trains the base weights peft.targets names: set peft.targets, e.g. ('ffn-keys',) or ('ffn-values',)")
    _check(self.rank >= 1, f"peft.rank must be >= 1, got {self.rank}")
    _check(self.alpha > 0, f"peft.alpha must be > 0, got {self.alpha}")
    _check(0 <= self.dropout < 1, f"peft.dropout must be in [0, 1), got {self.dropout}")
    for k, r in self.rank_pattern.items():
      _check(isinstance(r, int) and r >= 1, f"peft.rank_pattern[{k!r}] must be an integer >= 1, got {r!r}")
    for k, a in self.alpha_pattern.items():
      _check(isinstance(a, (int, float)) and a > 0, f"peft.alpha_pattern[{k!r}] must be > 0, got {a!r}")
    _check(self.n_experts >= 0 and self.top_k >= 0, "peft.n_experts and peft.top_k must be >= 0")
    _check(self.top_k <= max(self.n_experts, 0) or self.n_experts == 0, f"peft.top_k ({self.top_k}) must be <= peft.n_experts ({self.n_experts})")
    _check(self.n_experts == 0 or self.method in ("lora", "ia3", "bottleneck"), f"peft.n_experts (a mixture of adapters) works with lora, ia3 or bottleneck, not {self.method!r}")
    _check(self.prompt_len >= 1, f"peft.prompt_len must be >= 1, got {self.prompt_len}")
    _check(self.bottleneck_dim >= 1, f"peft.bottleneck_dim must be >= 1, got {self.bottleneck_dim}")
    _check(len(self.bottleneck_at) > 0 and set(self.bottleneck_at) <= {"attn", "ffn"}, f"peft.bottleneck_at must name attn and/or ffn, got {self.bottleneck_at!r}")
    _check(self.esft_score in ("gate", "token"), f"peft.esft_score must be 'gate' or 'token', got {self.esft_score!r}")
    _check(0 < self.esft_top_p <= 1, f"peft.esft_top_p must be in (0, 1], got {self.esft_top_p}")
    _check(self.esft_batches >= 1, f"peft.esft_batches must be >= 1, got {self.esft_batches}")
    _check(self.library_top_k >= 1, f"peft.library_top_k must be >= 1, got {self.library_top_k}")
    if self.method in ("arrow", "phatgoose"):
      _check(len(self.library) >= 2, f"peft.method={self.method!r} routes over a library: peft.library needs at least 2 adapter directories")
    if self.method == "phatgoose_gates":
      _check(len(self.library) == 1, "peft.method='phatgoose_gates' trains the gates of one adapter: set peft.library to its directory")
    _check(
        not (self.method == "bottleneck" and self.n_experts) or self.allow_noncausal_routing,
        "SMEAR-merged bottleneck experts (peft.n_experts > 0) route each sequence on its whole mean, future tokens included; "
        "set peft.allow_noncausal_routing=true to opt in",
    )

  def __hash__(self):  # the pattern dicts: hash by value
    return hash(tuple((f.name, str(getattr(self, f.name))) for f in dataclasses.fields(self)))


GROW_OPERATORS = ("none", "stack", "zero", "random", "split_ffn", "split_model")


@dataclasses.dataclass(frozen=True)
class GrowConfig:
  """Model growth on load (jaxlm.models.grow; Du et al. 2024, arXiv 2405.15319): the smaller
  model of `init_from` grown into `model` before training."""

  operator: str = "none"  # none (init_from's weights copied as they are), stack (G_stack: the source's layers repeated), zero / random (G_zero / G_random: new layers on top, output projections zero / fresh), split_ffn / split_model (width G_direct: FFN hidden units / d_model copied, their readers split)
  factor: int = 0  # growth factor g (0: read off model and the source, e.g. model.n_layers / the source's n_layers)
  split_noise: float = 0.1  # width operators: a split weight's g shares are (1 + u_c - mean u) / g, u ~ U(-noise, noise): same function, copies that drift apart (0: Net2Net's equal shares)

  def __post_init__(self):
    _check(self.operator in GROW_OPERATORS, f"grow.operator must be one of {', '.join(GROW_OPERATORS)}; got {self.operator!r}")
    _check(self.factor == 0 or self.factor >= 2, f"grow.factor must be >= 2 (or 0: read off model.n_layers / d_ff / d_model and the source's), got {self.factor}")
    _check(0 <= self.split_noise < 1, f"grow.split_noise must be in [0, 1), got {self.split_noise}")


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a run needs, readable top to bottom."""

  name: str = "experiment"  # run directory defaults to runs/<name>
  description: str = ""  # one line on what this experiment is for
  mesh: MeshConfig = MeshConfig()
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  peft: PeftConfig = PeftConfig()  # fine-tuning method (default: train every weight)
  init_from: str = ""  # weights to start from: a jaxlm run directory, or a Hugging Face model directory (whose config.json then sets the model architecture; the experiment keeps its dtype, remat, scan and kernel settings) ("": a fresh initialisation)
  grow: GrowConfig = GrowConfig()  # grow init_from's smaller model into `model` (model growth; default: copy it as it is)

  def __post_init__(self):
    _check(bool(self.name) and "/" not in self.name, f"experiment name must be non-empty without '/', got {self.name!r}")
    _check(
        self.data.batch_size % self.train.grad_accum == 0,
        f"data.batch_size ({self.data.batch_size}) must be divisible by train.grad_accum ({self.train.grad_accum})",
    )
    from jaxlm.data.tokenizers import TOKENIZERS

    n = TOKENIZERS.get(self.data.tokenizer).planned_vocab_size(self.data)  # None: known once its file is read (run.tokenizer_for)
    _check(n is None or self.model.vocab_size >= n, f"model.vocab_size ({self.model.vocab_size}) is smaller than the {n} tokens of data.tokenizer={self.data.tokenizer!r}")
    _check(self.grow.operator == "none" or bool(self.init_from), f"grow.operator={self.grow.operator!r} grows the model of init_from: set init_from to a smaller jaxlm run")
    _check(
        self.optim.migu_ratio in (0, 1) or self.peft.method in MIGU_PEFT_METHODS,
        f"optim.migu_ratio (MIGU) masks the updates of linear weights and of LoRA / DoRA adapters: peft.method must be one of {', '.join(MIGU_PEFT_METHODS)}, not {self.peft.method!r}",
    )
    if "soft_moe" in self.model.ffn_kinds and self.model.soft_moe.granularity == "segment":
      t = self.model.soft_moe.segment_len
      _check(self.data.seq_len % t == 0, f"data.seq_len ({self.data.seq_len}) must be a multiple of model.soft_moe.segment_len ({t})")


def to_dict(cfg: Any) -> Any:
  """A JSON-friendly nested dict of a config tree (tuples become lists)."""
  if dataclasses.is_dataclass(cfg):
    return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
  if isinstance(cfg, Mapping):
    return {k: to_dict(v) for k, v in cfg.items()}
  if isinstance(cfg, (tuple, list)):
    return [to_dict(v) for v in cfg]
  return cfg


def from_dict(cls: type, d: Mapping[str, Any]) -> Any:
  """Rebuild a config tree from `to_dict` output (unknown keys raise ConfigError)."""
  import typing

  hints = typing.get_type_hints(cls)
  kwargs = {}
  names = {f.name for f in dataclasses.fields(cls)}
  for k, v in d.items():
    _check(k in names, f"unknown config key {k!r} for {cls.__name__}")
    t = hints[k]
    if dataclasses.is_dataclass(t):
      kwargs[k] = from_dict(t, v)
    elif isinstance(v, list):
      kwargs[k] = _tuplify(v)
    else:
      kwargs[k] = v
  return cls(**kwargs)


def _tuplify(v: Any) -> Any:
  return tuple(_tuplify(x) for x in v) if isinstance(v, (list, tuple)) else v


# -- types ---------------------------------------------------------------------------------
# Every config class checks its fields' types before its own validation, so a wrong type in an
# experiment file (d_model="256", steps=10.5, targets="x") is one line naming the field instead
# of a TypeError from deep inside a comparison.

_PREFIXES = {
    "MeshConfig": "mesh",
    "MoEConfig": "model.moe",
    "SoftMoEConfig": "model.soft_moe",
    "HyperMoEConfig": "model.hypermoe",
    "AttentionConfig": "model.attention",
    "RopeScalingConfig": "model.rope_scaling",
    "ModelConfig": "model",
    "DataConfig": "data",
    "OptimConfig": "optim",
    "TrainConfig": "train",
    "CheckpointConfig": "checkpoint",
    "PeftConfig": "peft",
    "GrowConfig": "grow",
    "Experiment": "experiment",
}


def _type_error(value: Any, tp: Any) -> str | None:
  """None if `value` fits the annotation `tp`, else the expected type's name."""
  import typing

  origin = typing.get_origin(tp)
  if tp is Any:
    return None
  if tp is bool:
    return None if isinstance(value, bool) else "true or false"
  if tp is int:
    return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
  if tp is float:
    return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
  if tp is str:
    return None if isinstance(value, str) else "a string"
  if dataclasses.is_dataclass(tp):
    return None if isinstance(value, tp) else f"a {tp.__name__}"
  if origin is tuple or tp is tuple:
    if not isinstance(value, (tuple, list)):
      return "a tuple"
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis and args[0] is str and not all(isinstance(v, str) for v in value):
      return "a tuple of strings"
    return None
  if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
    return None if isinstance(value, Mapping) else "a mapping like {'a': 1.0}"
  return None


def _check_types(cfg: Any) -> None:
  import typing

  hints = typing.get_type_hints(type(cfg))
  prefix = _PREFIXES.get(type(cfg).__name__, type(cfg).__name__)
  for f in dataclasses.fields(cfg):
    want = _type_error(getattr(cfg, f.name), hints[f.name])
    if want is not None:
      name = f.name if prefix == "experiment" else f"{prefix}.{f.name}"
      raise ConfigError(f"{name} must be {want}, got {getattr(cfg, f.name)!r}")


def _typed(cls: type) -> None:
  validate = cls.__post_init__

  def __post_init__(self):
    _check_types(self)
    validate(self)

  cls.__post_init__ = __post_init__


for _cls in (MeshConfig, MoEConfig, SoftMoEConfig, HyperMoEConfig, AttentionConfig, RopeScalingConfig, ModelConfig, DataConfig, OptimConfig, TrainConfig, CheckpointConfig, PeftConfig, GrowConfig, Experiment):
  _typed(_cls)
