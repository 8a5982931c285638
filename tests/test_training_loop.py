"""The shared optimisation loop: its step budget keeps training time bounded on large training sets."""

import logging
import sys

import pytest
import torch

from stmae_edge.errors import ConfigError, TrainingError
from stmae_edge.training.loop import TrainConfig, optimize


def run_loop(count: int, cfg: TrainConfig) -> tuple[list[float], list[int]]:
    """optimize() on a one-weight model; returns its history and the batch size of every step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    steps = []

    def loss_of(idx, epoch, generator):
        steps.append(len(idx))
        return model(torch.ones(len(idx), 1)).pow(2).mean()

    return optimize(model, count, cfg, loss_of), steps


def test_every_epoch_is_trained_within_the_budget():
    history, steps = run_loop(100, TrainConfig(epochs=5, batch_size=10, max_steps=50))
    assert len(history) == 5 and steps == [10] * 50


def test_a_large_training_set_trains_fewer_whole_epochs_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="stmae_edge.training.loop"):
        history, steps = run_loop(100, TrainConfig(epochs=5, batch_size=10, max_steps=25))
    assert len(history) == 2 and len(steps) == 20  # whole epochs only: 2 x 10 steps <= 25
    assert "training 2 of 5 epochs" in caplog.text and "--max-steps 0" in caplog.text


def test_the_budget_holds_where_one_epoch_alone_exceeds_it_and_zero_means_no_cap(caplog):
    """A training set of thousands: the budget's steps of one epoch (images drawn at random), not the
    whole epoch past it (an 18,000-image set trained 1,125 steps against the 840 it was told)."""
    with caplog.at_level(logging.WARNING, logger="stmae_edge.training.loop"):
        history, steps = run_loop(100, TrainConfig(epochs=3, batch_size=10, max_steps=4))
    assert len(history) == 1 and steps == [10] * 4
    assert "training 4 steps of one epoch's 10 (40 of the images" in caplog.text
    assert len(run_loop(100, TrainConfig(epochs=3, batch_size=10, max_steps=0))[1]) == 30


def test_the_default_budget_is_the_default_schedule_on_magnetic_tile():
    # 686 training images (762 less a tenth held out), batches of 16: 42 steps an epoch, 20 epochs.
    d = TrainConfig()
    assert d.epochs * (686 // d.batch_size) == d.max_steps


def test_a_negative_budget_is_refused():
    with pytest.raises(ConfigError, match="max steps"):
        TrainConfig(max_steps=-1)


def test_a_diverging_loss_stops_training_with_what_to_do():
    """A loss that overflows (too high a learning rate) stops the run at once, in one line, instead of
    training every epoch on NaN and failing later in the statistics with a linear-algebra traceback."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    steps = []

    def loss_of(idx, epoch, generator):
        steps.append(len(idx))
        loss = model(torch.ones(len(idx), 1)).pow(2).mean()
        return loss * (float("inf") if len(steps) == 3 else 1.0)

    with pytest.raises(TrainingError, match=r"diverged at epoch 1, step 3: the loss is (inf|nan); .*lower --lr "
                                            r"\(this run: 0.5\)"):
        optimize(model, 100, TrainConfig(epochs=5, batch_size=10, lr=0.5), loss_of)
    assert len(steps) == 3 and all(torch.isfinite(p).all() for p in model.parameters())  # not stepped on it


def test_the_memory_estimate_follows_the_measured_peaks_and_warns_before_training(synthetic_dataset, tmp_path,
                                                                                   monkeypatch, caplog):
    """A folder too large for the machine ran out of memory after the backbone pass and the transformer's
    minutes; the estimate is said first, from the features kept per image."""
    from stmae_edge.models.stmae import STMAE, preset
    from stmae_edge.training import memory
    from stmae_edge.training.train import TrainConfig, train

    default = STMAE(preset("small"), backbone_weights="random")
    kept = memory.kept_bytes_per_image(default, (256, 256))
    assert kept == 2 * (176 * 32 * 32 + 344 * 16 * 16)
    # the default preset's measured peaks (docs/BENCHMARKS.md, "Training memory on large folders")
    for images, measured_gb in ((640, 3.61), (1280, 4.66)):
        assert abs(memory.peak_bytes(images, kept) / 1e9 - measured_gb) < 0.1 * measured_gb
    if sys.platform in ("linux", "win32"):  # /proc/meminfo (and the container's limit); GlobalMemoryStatusEx
        from stmae_edge.machine import total_memory_bytes

        assert 0 < memory.available_memory_bytes() <= total_memory_bytes()
    kept_tiny = memory.kept_bytes_per_image(STMAE(preset("tiny"), backbone_weights="random"), (64, 64))
    for available, said in ((2.7e9, None),
                            (memory.PEAK_BASE_BYTES + memory.PEAK_PER_KEPT * kept_tiny * 10.5,
                             "2.6 GB is available: it is likely to run out after the backbone pass; train on fewer "
                             "(--max-images 10) or on a machine with more memory"),
                            (2.0e9, "2.0 GB is available: it is likely to run out after the backbone pass; train on "
                                    "a machine with more memory")):
        monkeypatch.setattr(memory, "available_memory_bytes", lambda available=available: int(available))
        caplog.clear()
        with caplog.at_level("WARNING"):
            train(synthetic_dataset, tmp_path / "m.pt", preset("tiny"), TrainConfig(epochs=1, max_steps=1),
                  backbone_weights="random")
        if said is None:
            assert "of memory at its peak" not in caplog.text
        else:
            assert f"training on 24 images needs about 2.6 GB of memory at its peak and {said}" in caplog.text
    # with corrupted copies (or crops) more is kept per image: --max-images counts images all the same
    sets = 22 * 3 + 2  # 22 training images and two corrupted copies of each, 2 held out
    monkeypatch.setattr(memory, "available_memory_bytes",
                        lambda: int(memory.PEAK_BASE_BYTES + memory.PEAK_PER_KEPT * kept_tiny * sets / 24 * 10.5))
    caplog.clear()
    with caplog.at_level("WARNING"):
        train(synthetic_dataset, tmp_path / "m.pt", preset("tiny"),
              TrainConfig(epochs=1, max_steps=1, self_supervised=True), backbone_weights="random")
    assert (f"training on 24 images ({sets} feature sets: crops or corrupted copies) needs about 2.6 GB" in caplog.text
            and "train on fewer (--max-images 10)" in caplog.text)


def test_a_model_that_cannot_be_saved_after_training_is_saved_in_the_temp_folder(synthetic_dataset, tmp_path,
                                                                                monkeypatch):
    """A disk that filled up during training lost the whole training at the end: the model now goes to the
    temp folder, and the error names where. (The write to --out is made to fail as a full disk would.)"""
    import tempfile

    from stmae_edge import checkpoint
    from stmae_edge.errors import OutputError
    from stmae_edge.models.stmae import preset
    from stmae_edge.training import train as train_module

    out = tmp_path / "model.pt"
    real_save = checkpoint.save_checkpoint

    def disk_full_at_out(path, model, metadata):
        if path == out:
            raise OutputError(f"cannot write {out}: no space left on the disk; nothing was replaced")
        return real_save(path, model, metadata)

    monkeypatch.setattr(train_module, "save_checkpoint", disk_full_at_out)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    (tmp_path / "temp").mkdir()
    with pytest.raises(OutputError, match=r"no space left on the disk; nothing was replaced; the trained model was "
                                          r"saved to .*model\.[0-9a-f]{8}\.pt instead") as caught:
        train_module.train(synthetic_dataset, out, preset("tiny"), TrainConfig(epochs=1, batch_size=8),
                           backbone_weights="random")
    rescued = next((tmp_path / "temp").glob("model.*.pt"))
    assert str(rescued) in str(caught.value) and not out.exists()
    assert checkpoint.read_checkpoint(rescued)[0].training["train_images"] > 0  # the whole model, readable
