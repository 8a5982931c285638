"""Progress on a pipe (CI logs, nohup): plain lines while the work goes on, not silence until the end."""

from __future__ import annotations

import pytest
from rich.console import Console

from stmae_edge import progress


@pytest.fixture(autouse=True)
def on_a_pipe(monkeypatch):
    """As under nohup or in CI, even when pytest itself runs in a terminal with -s."""
    monkeypatch.setattr(progress, "_console", Console(stderr=True, force_terminal=False))


def test_a_pipe_gets_periodic_lines_and_a_final_one(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with progress.progress_bar("training", 3) as advance:
        for epoch in range(3):
            advance(1, status=f"epoch {epoch + 1}/3")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and lines[0].startswith("training: 1/3") and "epoch 1/3" in lines[0]
    assert lines[-1].startswith("training: 3/3") and lines[-1].endswith("epoch 3/3")


def test_a_pipe_is_not_flooded(capsys):
    with progress.progress_bar("features", 1000) as advance:
        for _ in range(1000):
            advance()
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_work_stopped_on_a_pipe_says_how_far_it_got(capsys):
    """An interrupted run's log never said how far it had come (a line every 30 s, and at the end)."""
    with pytest.raises(KeyboardInterrupt), progress.progress_bar("training", 10) as advance:
        advance(3, status="epoch 1/4")
        raise KeyboardInterrupt
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("training: 3/10 in ") and lines[0].endswith("epoch 1/4 (stopped)")


def test_a_refusal_before_any_step_is_the_one_line_said_with_no_bar_above_it(capsys):
    """predict --threshold nan printed "scoring (ort-cpu): 0/4 in 0.0s (stopped)" above its error line
    (on a terminal, the bar is hidden the same way)."""
    from stmae_edge.errors import ConfigError

    with pytest.raises(ConfigError), progress.progress_bar("scoring", 4):
        raise ConfigError("image threshold nan must be a finite number")
    assert capsys.readouterr().err == ""
    with pytest.raises(KeyboardInterrupt), progress.progress_bar("scoring", 4) as advance:
        advance(0, status="loading the model")
        raise KeyboardInterrupt  # stopped by the user: the log says where, even before the first step
    assert capsys.readouterr().err.strip().endswith("loading the model (stopped)")


def test_a_calling_program_can_turn_the_bars_off(capsys):
    """train, evaluate and export wrote their progress to the host program's stderr, with no way to stop it."""
    with progress.progress_shown(False), progress.progress_bar("training", 3) as advance:
        advance(3, status="epoch 1/1")
    assert capsys.readouterr().err == ""
    with progress.progress_bar("training", 1) as advance:  # on again after the block
        advance()
    assert capsys.readouterr().err.startswith("training: 1/1")
