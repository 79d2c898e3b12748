"""Bad soft-MoE settings are one-line errors with exit code 2 that write nothing."""

import pytest

from jaxlm.cli import main

SOFT = ["--set", "model.ffn=soft_moe", "--set", "model.soft_moe.segment_len=16"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--set", "model.soft_moe.segment_len=48"], "data.seq_len (64) must be a multiple of model.soft_moe.segment_len (48)"),
        (["--set", "model.soft_moe.segment_len=0"], "model.soft_moe.segment_len must be >= 1, got 0"),
        (["--set", "model.soft_moe.n_experts=0"], "model.soft_moe.n_experts must be >= 1, got 0"),
        (["--set", "model.soft_moe.granularity=sequence"], "set model.soft_moe.allow_noncausal_routing=true to opt in"),
        (["--set", "model.soft_moe.first_segment=future"], "model.soft_moe.first_segment must be 'paper' or 'uniform'"),
        (["--set", "model.soft_moe.merge=nosuch"], "model.soft_moe.merge 'nosuch' is not a merge implementation; known: auto, einsum, pallas"),
        (["--set", "model.soft_moe.decode_routing=tokens"], "model.soft_moe.decode_routing must be 'prompt' or 'segments'"),
        # the dense flag would be set and never cleared (0 steps), or the experts never copied (all steps)
        (["--set", "model.soft_moe.dense_warmup=0.05"], "model.soft_moe.dense_warmup=0.05 x train.steps=6 rounds to 0 warm-up steps; it must give between 1 and train.steps - 1"),
        (["--set", "model.soft_moe.dense_warmup=0.95"], "model.soft_moe.dense_warmup=0.95 x train.steps=6 rounds to 6 warm-up steps; it must give between 1 and train.steps - 1"),
        (["--set", "data.similarity=cosine"], "data.similarity must be none, exact, lsh or auto"),
    ],
)
def test_bad_soft_moe_input_is_one_line_exit_2(overrides, message, tmp_path, capsys):
  run_dir = tmp_path / "run"
  assert main(["train", "quickstart:smoke", *SOFT, *overrides, "--run-dir", str(run_dir)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("jaxlm: error: ") and message in err, err
  assert "\n" not in err and "Traceback" not in err
  assert not run_dir.exists()


def test_sequence_routing_with_the_opt_in_is_accepted():
  from jaxlm import experiments

  exp = experiments.load("quickstart:smoke", [*SOFT[1::2], "model.soft_moe.granularity=sequence", "model.soft_moe.allow_noncausal_routing=true"])
  assert exp.model.soft_moe.granularity == "sequence"


def test_dense_warmup_of_one_to_steps_minus_one_is_accepted():
  from jaxlm import experiments
  from jaxlm.train import loop

  for frac in (0.1, 0.9):  # 6 steps: 1 and 5 warm-up steps
    exp = experiments.load("quickstart:smoke", [*SOFT[1::2], f"model.soft_moe.dense_warmup={frac}"])
    loop.validate(exp, None)
