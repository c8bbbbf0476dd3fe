"""Progress on long work: a bar only in a terminal (plain lines in logs), and the training curve a trainer
writes (model_core.workflows.handlers.TerminalProgressBar, TrainingCurve) on real Ignite engines."""

from __future__ import annotations

import io
import json

import pytest
import torch
from ignite.engine import Engine, Events
from monai.engines import Evaluator
from monai.handlers import ValidationHandler

from model_core.workflows.handlers import TerminalProgressBar, TrainingCurve, is_terminal


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_is_drawn_in_a_terminal_only(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    for stream, drawn in ((_Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr("sys.stderr", stream)
        assert is_terminal() is drawn
        engine = Engine(lambda e, b: {"loss": torch.tensor(float(b))})
        handler = TerminalProgressBar("training", output_transform=lambda out: {"loss": out["loss"].item()})
        handler.attach(engine)
        engine.run([1, 2, 3], max_epochs=1)
        assert (handler.bar is not None) is drawn
        assert ("training" in stream.getvalue()) is drawn
    monkeypatch.setattr("sys.stderr", _Terminal())
    monkeypatch.setenv("TQDM_DISABLE", "1")  # the tests' and benchmarks' setting
    assert not is_terminal()


@pytest.mark.parametrize("at_start", [False, True])
def test_the_curve_pairs_each_epoch_loss_with_its_validation(tmp_path, at_start):
    """The trainer's ValidationHandler runs before the curve sees the epoch end (it is attached first)."""
    scores = iter([0.1, 0.5, 0.8, 0.9])

    evaluator = Evaluator(device="cpu", val_data_loader=[0], iteration_update=lambda engine, batch: batch)

    @evaluator.on(Events.COMPLETED)
    def score(engine):
        engine.state.metrics["val_mean_dice"] = next(scores)

    trainer = Engine(lambda e, b: {"loss": torch.tensor(float(b))})
    ValidationHandler(interval=1, validator=evaluator, epoch_level=True, exec_at_start=at_start).attach(trainer)
    path = tmp_path / "curve.json"
    TrainingCurve(str(path), evaluator=evaluator).attach(trainer)
    trainer.run([1.0, 3.0], max_epochs=2)
    curve = json.loads(path.read_text())
    expected = [{"epoch": 1, "iteration": 2, "loss": 2.0}, {"epoch": 2, "iteration": 4, "loss": 2.0}]
    dice = [0.5, 0.8] if at_start else [0.1, 0.5]
    for entry, value in zip(expected, dice):
        entry["val_mean_dice"] = value
    if at_start:
        expected.insert(0, {"epoch": 0, "iteration": 0, "loss": None, "val_mean_dice": 0.1})
    assert curve["epochs"] == expected
    assert curve["iterations"] == [[1, 1.0], [2, 3.0], [3, 1.0], [4, 3.0]]
