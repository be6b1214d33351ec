"""The run's story: history.jsonl survives a kill and a resume; training_curves.png is drawn from it."""

import json

from PIL import Image

from modeling_mae.training.run_history import RunHistory, plot_training_curves


def test_history_appends_truncates_on_resume_and_survives_a_cut_line(tmp_path):
    history = RunHistory(tmp_path)
    history.truncate(0)
    for step in (0, 10, 20, 30):
        history.append(step, {"train/loss": 1.0 / (1 + step), "knn/cls_top1": step, "note": "ignored"})
    with (tmp_path / "history.jsonl").open("a") as f:
        f.write('{"step": 40, "train/lo')  # a kill in the middle of a line
    resumed = RunHistory(tmp_path)
    assert [row["step"] for row in resumed.rows] == [0, 10, 20, 30]
    resumed.truncate(20)  # resumed from the checkpoint of step 20: 30 comes again
    assert [json.loads(line)["step"] for line in (tmp_path / "history.jsonl").read_text().splitlines()] == [0, 10, 20]
    assert resumed.series("knn/cls_top1") == ([0, 10, 20], [0.0, 10.0, 20.0])
    assert resumed.first_and_last("knn/cls_top1") == ((0, 0.0), (20, 20.0))


def test_training_curves_png_has_a_panel_for_knn_only_when_there_is_one(tmp_path):
    history = RunHistory(tmp_path)
    for step in range(0, 50, 10):
        history.append(step, {"train/loss": 1 - step / 100, "train/trivial_loss": 1.0, "train/lr": 1e-3})
    without = Image.open(plot_training_curves(history, tmp_path / "a.png"))
    history.append(0, {"knn/cls_top1": 20.0})
    history.append(40, {"knn/cls_top1": 35.0})
    with_knn = Image.open(plot_training_curves(history, tmp_path / "b.png"))
    assert with_knn.width > without.width and with_knn.height == without.height
    assert plot_training_curves(RunHistory(tmp_path / "empty", enabled=False), tmp_path / "c.png") is None
