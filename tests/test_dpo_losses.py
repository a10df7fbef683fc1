"""DPO loss types: the spec accepts exactly TRL's, each trains through the farm's `dpo` stage
(TRL's DPOTrainer) on a tiny model on CPU, and `label_smoothing` is refused where no chosen loss
reads it."""

import inspect
import math
import re

import pytest
from pydantic import ValidationError

from farm.data.records import Comparison
from farm.models import ModelSpec
from farm.stages.dpo import DPO, DPO_LOSSES, DPO_SMOOTHED_LOSSES
from farm.train.base import StageContext

BETA = 0.1
LN2 = math.log(2)
SMOOTHING = 0.1  # for the losses that read it

# Each loss at the first step, where the policy is its reference (TRL disables dropout): every
# log-ratio is 0, so each loss has a closed form in beta and label_smoothing. None: no closed form
# (sft is the NLL of the chosen answers).
AT_START = {
    "sigmoid": LN2,
    "hinge": 1.0,
    "ipo": (1 / (2 * BETA)) ** 2,
    "exo_pair": 0.5 * math.log(0.25 / ((1 - SMOOTHING) * SMOOTHING)),
    "nca_pair": 2 * LN2,
    "robust": LN2,
    "bco_pair": 2 * LN2,
    "sppo_hard": 2 * (0.5 / BETA) ** 2,
    "aot": LN2,
    "aot_unpaired": LN2,
    "apo_zero": 1.0,
    "apo_down": 1.0,
    "discopop": 0.5 * LN2 + 0.5,
    "sft": None,
    "sigmoid_norm": LN2,
}


def _trl_branches() -> dict[str, str]:
    """{loss type: the source of its branch} in TRL's DPOTrainer._compute_loss."""
    from trl import DPOTrainer

    source = inspect.getsource(DPOTrainer._compute_loss)
    parts = re.split(r'\n\s*(?:el)?if loss_type == "(\w+)":', source)
    return dict(zip(parts[1::2], parts[2::2]))


def test_the_loss_types_are_trls():
    from trl import DPOConfig

    branches = _trl_branches()
    assert set(branches) == set(DPO_LOSSES)
    assert set(AT_START) == set(DPO_LOSSES)
    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    assert set(re.findall(r"`'(\w+)'`", help_text)) == set(DPO_LOSSES)
    # the losses whose branch reads label_smoothing
    assert {name for name, code in branches.items() if "label_smoothing" in code} == set(DPO_SMOOTHED_LOSSES)


def pairs(n=6):
    return [
        Comparison(id=str(i), prompt=f"\n\nHuman: question {i}?\n\nAssistant:", chosen=f" A kind answer {i}.", rejected=f" go away {i}")
        for i in range(n)
    ]


def train_one_step(tmp_path, **spec) -> float:
    stage = DPO(kind="dpo", max_steps=1, batch_size=4, max_length=32, max_prompt_length=16, beta=BETA, **spec)
    model = ModelSpec(config={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64})
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    ctx = StageContext("dpo", stage, model, 0, None, pairs(), out, work, [])
    metrics = ctx.stage.run(ctx)
    assert metrics["train_steps"] == 1
    return metrics["train_loss"]


@pytest.mark.parametrize("loss", DPO_LOSSES)
def test_every_loss_type_trains(tmp_path, loss):
    smoothing = SMOOTHING if loss in DPO_SMOOTHED_LOSSES else 0.0
    got = train_one_step(tmp_path, loss_type=loss, label_smoothing=smoothing)
    assert math.isfinite(got) and got > 0
    if AT_START[loss] is not None:  # the loss TRL computed is the one named
        assert got == pytest.approx(AT_START[loss], rel=1e-4)
    else:  # sft: the NLL of a random model's answers, about log(vocabulary size)
        assert got > 3


def test_a_weighted_sum_of_losses(tmp_path):
    got = train_one_step(tmp_path, loss_type={"sigmoid": 0.5, "hinge": 2.0})
    assert got == pytest.approx(0.5 * LN2 + 2.0, rel=1e-4)


# ---------------------------------------------------------------- the spec


@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "ipo", ["sigmoid", "sft"]])
def test_label_smoothing_a_loss_ignores_is_refused(loss):
    with pytest.raises(ValidationError, match=r"label_smoothing: loss_type .* does not read it .* robust, exo_pair, aot, aot_unpaired"):
        DPO(kind="dpo", loss_type=loss, label_smoothing=0.1)


def test_label_smoothing_goes_to_the_losses_that_read_it():
    assert DPO(kind="dpo", loss_type="robust", label_smoothing=0.1).label_smoothing == 0.1
    assert DPO(kind="dpo", loss_type=["sigmoid", "aot"], label_smoothing=0.1).losses() == {"sigmoid": 1.0, "aot": 1.0}
    with pytest.raises(ValidationError, match="exo_pair needs label_smoothing > 0"):
        DPO(kind="dpo", loss_type="exo_pair")
    with pytest.raises(ValidationError, match="robust needs label_smoothing < 0.5"):
        DPO(kind="dpo", loss_type="robust", label_smoothing=0.5)


@pytest.mark.parametrize(
    "loss_type, message",
    [
        ("dpo", "unknown loss type 'dpo'; TRL 1.16's: sigmoid, hinge"),
        (["sigmoid", "kto"], "unknown loss type 'kto'"),
        ([], "a loss type, a list of them or a mapping"),
        (["sigmoid", "sigmoid"], "names a loss twice"),
        ({"sigmoid": 0}, "the weight of 'sigmoid' is 0; weights are positive numbers"),
    ],
)
def test_bad_loss_types_are_refused_in_one_message(loss_type, message):
    with pytest.raises(ValidationError, match=re.escape(message)) as e:
        DPO(kind="dpo", loss_type=loss_type)
    assert e.value.error_count() == 1 and e.value.errors()[0]["loc"] == ("loss_type",)


def test_the_spec_keeps_the_form_it_was_given():
    assert DPO(kind="dpo").model_dump()["loss_type"] == "sigmoid"  # unchanged stage keys
    assert DPO(kind="dpo").losses() == {"sigmoid": 1.0}
    mpo = DPO(kind="dpo", loss_type={"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0})
    assert mpo.losses() == {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}
