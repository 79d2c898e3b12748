"""Model merging: hand-worked task arithmetic, TIES and DARE; exact LoRA concatenation merge."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.errors import ConfigError
from jaxlm.peft.merging import dare, lora_cat, lora_delta, svd_truncate, task_arithmetic, task_vectors, ties

BASE = np.array([1.0, 2.0, -1.0, 0.0, 0.5], np.float32)
# Three task vectors of 5 entries; with density 0.6 each keeps its 3 largest |entries|.
TAUS = np.array(
    [
        [1.0, -2.0, 3.0, -0.5, 0.1],  # trim -> [ 1, -2, 3, 0,  0]
        [-3.0, 1.0, -1.0, 4.0, 0.2],  # trim -> [-3,  1, 0, 4,  0]  (|1| tie: lower index kept)
        [0.5, -1.5, 2.0, -1.0, -3.0],  # trim -> [ 0, -1.5, 2, 0, -3]
    ],
    np.float32,
)


def tasks_of(taus, base=BASE):
  return [{"w": base + t} for t in taus]


def test_task_vectors_and_arithmetic_by_hand():
  base = {"w": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), "b": np.array([0.5], np.float32)}
  t1 = {"w": np.array([[2.0, 2.0], [3.0, 6.0]], np.float32), "b": np.array([1.5], np.float32)}
  t2 = {"w": np.array([[1.0, 0.0], [4.0, 4.0]], np.float32), "b": np.array([-0.5], np.float32)}
  tau1, tau2 = task_vectors(base, [t1, t2])
  np.testing.assert_array_equal(tau1["w"], [[1.0, 0.0], [0.0, 2.0]])
  np.testing.assert_array_equal(tau2["b"], [-1.0])
  merged = task_arithmetic(base, [t1, t2], weights=[0.5, 2.0])
  # base + 0.5 * tau1 + 2 * tau2: tau2 w = [[0, -2], [1, 0]]
  np.testing.assert_allclose(merged["w"], [[1.5, -2.0], [5.0, 5.0]])
  np.testing.assert_allclose(merged["b"], [0.5 + 0.5 - 2.0])
  np.testing.assert_allclose(task_arithmetic(base, [t1, t2])["w"], [[2.0, 0.0], [4.0, 6.0]])


def test_ties_by_hand():
  # elected sign of the sum of trimmed: [1-3+0 < 0, -2+1-1.5 < 0, 3+0+2 > 0, 4 > 0, -3 < 0]
  # disjoint mean of the agreeing entries: [-3, (-2 - 1.5) / 2, (3 + 2) / 2, 4, -3]
  merged = ties({"w": BASE}, tasks_of(TAUS), density=0.6)
  np.testing.assert_allclose(merged["w"] - BASE, [-3.0, -1.75, 2.5, 4.0, -3.0], atol=1e-6)
  # one task: TIES is base + its trimmed task vector, which shows the trim and its tie-breaking
  one = ties({"w": BASE}, tasks_of(TAUS[1:2]), density=0.6)
  np.testing.assert_allclose(one["w"] - BASE, [-3.0, 1.0, 0.0, 4.0, 0.0], atol=1e-6)
  # trimming is invariant to a common weight, the sign election too: the merge scales with it
  twice = ties({"w": BASE}, tasks_of(TAUS), density=0.6, weights=2.0)
  np.testing.assert_allclose(twice["w"] - BASE, 2 * (merged["w"] - BASE), atol=1e-6)


def test_ties_opposite_signs_cancel_to_zero():
  base = {"w": np.zeros(2, np.float32)}
  tasks = [{"w": np.array([1.0, 2.0], np.float32)}, {"w": np.array([-1.0, 1.0], np.float32)}]
  np.testing.assert_array_equal(ties(base, tasks, density=1.0)["w"], [0.0, 1.5])


def test_ties_keeps_exactly_ceil_density_entries_and_jits():
  base = {"w": jnp.zeros((4, 5))}
  tasks = [{"w": jnp.ones((4, 5))}]  # every magnitude ties
  for density, kept in [(0.7, 14), (0.05, 1), (0.51, 11)]:
    assert int((ties(base, tasks, density=density)["w"] != 0).sum()) == kept
  tasks = tasks_of(TAUS)
  jitted = jax.jit(functools.partial(ties, density=0.6))({"w": BASE}, tasks)
  np.testing.assert_array_equal(jitted["w"], ties({"w": BASE}, tasks, density=0.6)["w"])


def test_dare_without_drop_is_task_arithmetic():
  key = jax.random.key(0)
  weights = [0.5, -1.0, 2.0]
  merged = dare({"w": BASE}, tasks_of(TAUS), drop=0.0, key=key, weights=weights)
  np.testing.assert_array_equal(merged["w"], task_arithmetic({"w": BASE}, tasks_of(TAUS), weights)["w"])
  merged = dare({"w": BASE}, tasks_of(TAUS), drop=0.0, key=key, combine="ties", density=0.6)
  np.testing.assert_array_equal(merged["w"], ties({"w": BASE}, tasks_of(TAUS), density=0.6)["w"])


def test_dare_rescales_kept_entries_and_preserves_the_mean():
  tau = np.random.default_rng(1).standard_normal(100_000, np.float32) + 1.0
  base = {"w": np.zeros_like(tau)}
  out = dare(base, [{"w": tau}], drop=0.5, key=jax.random.key(2))["w"]
  kept = out != 0
  np.testing.assert_array_equal(out[kept], 2.0 * tau[np.asarray(kept)])
  assert 0.45 < float(kept.mean()) < 0.55
  np.testing.assert_allclose(out.mean(), tau.mean(), atol=0.03)


def test_dare_randomness_differs_by_key_task_and_leaf():
  ones = jnp.ones(256)
  base = {"a": jnp.zeros(256), "b": jnp.zeros(256)}
  task = {"a": ones, "b": ones}
  out0 = dare(base, [task], drop=0.5, key=jax.random.key(0))
  out1 = dare(base, [task], drop=0.5, key=jax.random.key(1))
  assert not np.array_equal(out0["a"], out1["a"])  # keys
  assert not np.array_equal(out0["a"], out0["b"])  # leaves
  # two identical tasks with opposite weights cancel only if they share a mask
  both = dare(base, [task, task], drop=0.5, key=jax.random.key(0), weights=[1.0, -1.0])
  assert np.abs(both["a"]).max() == 2.0


def test_non_float_leaves_come_from_base():
  base = {"w": BASE, "step": np.array(5, np.int32)}
  tasks = [{"w": BASE + t, "step": np.array(7 + i, np.int32)} for i, t in enumerate(TAUS)]
  key = jax.random.key(0)
  for merged in [
      task_arithmetic(base, tasks),
      ties(base, tasks, density=0.6),
      dare(base, tasks, drop=0.3, key=key, combine="ties", density=0.6),
  ]:
    assert merged["step"].dtype == np.int32 and int(merged["step"]) == 5
  assert int(task_vectors(base, tasks)[0]["step"]) == 0


def test_lora_cat_equals_weighted_sum_of_deltas():
  """Expert-stacked adapters (n_stack=1), fan_in D=4, fan_out (H, K) = (3, 5), ranks 2 and 3."""
  rng = np.random.default_rng(0)
  a1, b1 = rng.standard_normal((2, 4, 2), np.float32), rng.standard_normal((2, 2, 3, 5), np.float32)
  a2, b2 = rng.standard_normal((2, 4, 3), np.float32), rng.standard_normal((2, 3, 3, 5), np.float32)
  weights, scales = (0.3, -1.2), (0.5, 2.0)
  a, b = lora_cat([(a1, b1, scales[0]), (a2, b2, scales[1])], weights, n_stack=1, n_in=1)
  assert a.shape[-1] == b.shape[1] == 5
  expected = sum(
      w * s * np.einsum("edr,erhk->edhk", np.asarray(x, np.float64), np.asarray(y, np.float64))
      for w, s, x, y in zip(weights, scales, (a1, a2), (b1, b2))
  )
  np.testing.assert_allclose(lora_delta(a, b, 1.0, n_stack=1), expected, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(lora_delta(a1, b1, 0.5, n_stack=1), 0.5 * np.einsum("edr,erhk->edhk", a1, b1), atol=1e-6)


def test_svd_truncate_recovers_low_rank_delta():
  rng = np.random.default_rng(3)
  a, b = rng.standard_normal((2, 6, 2), np.float32), rng.standard_normal((2, 2, 3, 4), np.float32)  # [E,D,R], [E,R,H,K]
  delta = lora_delta(a, b, n_stack=1)
  a2, b2 = svd_truncate(delta, 2, n_stack=1, n_in=1)
  np.testing.assert_allclose(lora_delta(a2, b2, n_stack=1), delta, atol=1e-4)
  # Eckart-Young: the best rank-1 approximation misses exactly the second singular value
  a1, b1 = svd_truncate(delta, 1, n_stack=1, n_in=1)
  err = np.linalg.norm(np.asarray(lora_delta(a1, b1, n_stack=1) - delta).reshape(2, -1), axis=-1)
  sigma2 = np.linalg.svd(np.asarray(delta).reshape(2, 6, 12), compute_uv=False)[:, 1]
  np.testing.assert_allclose(err, sigma2, rtol=1e-4)


BASE_TREE = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
TASK = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
KEY = jax.random.key(0)
ADAPTER = (np.ones((4, 2), np.float32), np.ones((2, 5), np.float32), 1.0)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: task_arithmetic(BASE_TREE, []), "no task models"),
        (lambda: task_arithmetic(BASE_TREE, [TASK, TASK], weights=[1.0]), "1 weights for 2 tasks"),
        (lambda: ties(BASE_TREE, [TASK], density=0.0), "density"),
        (lambda: ties(BASE_TREE, [TASK], density=1.5), "density"),
        (lambda: dare(BASE_TREE, [TASK], drop=1.0, key=KEY), "drop"),
        (lambda: dare(BASE_TREE, [TASK], drop=-0.1, key=KEY), "drop"),
        (lambda: dare(BASE_TREE, [TASK], drop=0.1, key=KEY, combine="mean"), "unknown DARE combine 'mean'"),
        (lambda: task_arithmetic(BASE_TREE, [{"w": TASK["w"]}]), r"base has \['b'\], task has \['w'\]"),
        (lambda: task_arithmetic(BASE_TREE, [TASK, {**TASK, "c": TASK["b"]}]), r"task 1 .* task has \['c'\]"),
        (lambda: task_arithmetic(BASE_TREE, [{**TASK, "w": np.ones((3, 2))}]), r"at \['w'\]: shape \(3, 2\)"),
        (lambda: lora_cat([]), "no LoRA adapters"),
        (lambda: lora_cat([ADAPTER, (np.ones((3, 2)), np.ones((2, 5)), 1.0)]), "adapter 1"),
        (lambda: lora_cat([ADAPTER, ADAPTER], [1.0, 2.0, 3.0]), "3 weights for 2 adapters"),
        (lambda: svd_truncate(np.ones((4, 5)), 5), "rank"),
    ],
)
def test_bad_input_raises_config_error(call, message):
  with pytest.raises(ConfigError, match=message):
    call()
