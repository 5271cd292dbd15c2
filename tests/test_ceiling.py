"""The resolution ceiling (data/ceiling.py): the cell-averaged ground truth, upsampled as evaluation does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.ceiling import ceiling_prediction, resolution_ceiling_scores
from data.files import read_split
from tests.helpers import write_domain


def test_classes_drawn_on_whole_cells_are_reproduced():
    cells = torch.tensor([[0, 1, 2], [3, 4, 5]])
    label = cells.repeat_interleave(16, 0).repeat_interleave(16, 1)  # [32, 48], one class per 16 x 16 cell
    assert torch.equal(ceiling_prediction(label, 16, 6), label)


def test_an_object_much_smaller_than_a_cell_is_lost():
    label = torch.zeros(32, 32, dtype=torch.long)
    label[5:8, 20:23] = 4  # a 3 x 3 "car" inside one 16-px cell
    assert not (ceiling_prediction(label, 16, 6) == 4).any()
    assert torch.equal(ceiling_prediction(label, 1, 6), label)  # a map at full resolution keeps it


def test_ignored_pixels_vote_for_no_class():
    label = torch.full((16, 16), 255, dtype=torch.long)
    label[:3, :3] = 2  # the only labelled pixels of the cell
    assert (ceiling_prediction(label, 16, 6) == 2).all()


def test_scores_of_a_folder(tmp_path):
    write_domain(tmp_path, "val", n=2, size=(32, 32))
    labelled = sum(int((label != 255).sum()) for _, label in read_split(tmp_path, "val"))
    full = resolution_ceiling_scores(tmp_path, "val", stride=1)
    assert full["miou"] == pytest.approx(100.0) and full["pixels"] == labelled
    coarse = resolution_ceiling_scores(tmp_path, "val", stride=16)  # random labels: one class wins each cell
    assert coarse["miou"] < 50 and coarse["stride"] == 16
    assert all(v is None or 0 <= v <= 100 for v in coarse["iou"])
    resized = resolution_ceiling_scores(tmp_path, "val", stride=16, resize=16)  # one cell a patch
    predicted = np.concatenate([ceiling_prediction(torch.from_numpy(label), 16, 6).numpy().ravel()
                                for _, label in read_split(tmp_path, "val", 16)])
    assert len(np.unique(predicted)) <= 2 and resized["pixels"] <= 2 * 16 * 16
