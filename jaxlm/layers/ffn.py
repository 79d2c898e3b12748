"""The FFN registry: every kind of feed-forward block a decoder layer can hold.

An FFN kind is an `nnx.Module` class with `__init__(cfg: ModelConfig, *, rngs)` and
`__call__(x_bld, *, segment_ids=None, positions=None) -> y_bld | (y_bld, aux)`. `aux` is a
dict with optional entries `"losses"` ({name: scalar, already weighted}; the model sums them
over layers and the trainer adds them to the loss) and `"metrics"` ({name: array}; the model
stacks them over the layers of that kind). The class also provides
`forward_flops_per_token(cfg, seq_len) -> float` (matmul FLOPs, for MFU and the FLOPs
benchmark) and, if some of its parameters sit idle for a given token, `inactive_params(cfg)`
(for the active-parameter count), and `validate(exp, mesh_shape) -> None` raising ConfigError
for settings that depend on the mesh (called by the trainer before anything is written).
Optional, for kinds that need them: `init_decode_state(cfg, batch, max_len)` plus
`decode(x_bld, state, *, positions, segment_ids) -> (y_bld, state)` keep per-sequence state
while generating (the model stores it next to each block's KV cache); `train_hooks(exp,
graphdef, state) -> {step: fn(TrainState) -> TrainState}` transforms the train state once after
a given step (the trainer compiles each once). The soft MoE uses both.
Kinds: `dense` (jaxlm.layers.mlp), `moe`
(jaxlm.layers.moe), `soft_moe` (jaxlm.layers.soft_moe).
"""

from jaxlm.registry import Registry

FFN: Registry = Registry("ffn kind")
