"""The resolution ceiling (engine/ceiling.py): cell label fractions through the classifier's evaluation path."""

from __future__ import annotations

import pytest
import torch

from engine.ceiling import ceiling_prediction, nearest_cell, resolution_ceiling_scores
from engine.evaluate import upsampled_argmax
from models.napg import upsample_logits
from tests.helpers import write_domain


def reference_prediction(label: torch.Tensor, stride: int, num_classes: int) -> torch.Tensor:
    """Plain loops: each pixel joins the cell whose centre, upsampled to H/4 with corners aligned and then to
    H at half-pixel offsets, lies nearest; a cell's scores are its labelled pixels' class fractions."""
    height, width = label.shape
    h, w = height // stride, width // stride

    def centres(cells: int, size: int) -> list[float]:
        up = size // 4
        return [4 * ((i * (up - 1) / (cells - 1) if cells > 1 else 0.0) + 0.5) - 0.5 for i in range(cells)]

    rows, cols = centres(h, height), centres(w, width)
    counts = torch.zeros(num_classes, h, w, dtype=torch.float64)
    for y in range(height):
        for x in range(width):
            if label[y, x] != 255:
                i = min(range(h), key=lambda k: (abs(rows[k] - y), k))
                j = min(range(w), key=lambda k: (abs(cols[k] - x), k))
                counts[label[y, x], i, j] += 1
    fractions = counts / counts.sum(0).clamp(min=1)
    logits_up = upsample_logits(fractions[None].float(), (height // 4, width // 4))
    return upsampled_argmax(logits_up, (height, width))[0]


def test_the_ceiling_matches_a_plain_reference():
    torch.manual_seed(0)
    # Blobs of a few classes with ignored pixels, on a map of 3 x 4 cells.
    coarse = torch.randint(0, 6, (6, 8))
    label = coarse.repeat_interleave(8, 0).repeat_interleave(8, 1)
    label[torch.rand(label.shape) < 0.1] = 255
    assert torch.equal(ceiling_prediction(label, 16, 6), reference_prediction(label, 16, 6))


def test_pixels_join_the_nearest_upsampled_cell():
    # 64 px, 4 cells: logits_up has 16 px with the cells at 0, 5, 10 and 15, i.e. image px 1.5, 21.5, 41.5, 61.5.
    assert nearest_cell(64, 4).tolist() == [0] * 12 + [1] * 20 + [2] * 20 + [3] * 12
    assert nearest_cell(16, 1).tolist() == [0] * 16


def test_a_uniform_label_is_reproduced_and_a_small_object_is_lost():
    label = torch.full((64, 64), 2, dtype=torch.long)
    assert (ceiling_prediction(label, 16, 6) == 2).all()
    label[30:34, 30:34] = 4  # a 4 x 4 "car": a sixteenth of a cell
    assert not (ceiling_prediction(label, 16, 6) == 4).any()
    label[16:48, 16:48] = 4  # four cells' worth
    assert (ceiling_prediction(label, 16, 6)[28:36, 28:36] == 4).all()


def test_ignored_pixels_vote_for_no_class():
    label = torch.full((16, 16), 255, dtype=torch.long)
    label[:3, :3] = 2  # the only labelled pixels of the one cell
    assert (ceiling_prediction(label, 16, 6) == 2).all()


def test_sizes_off_the_stride_are_refused():
    with pytest.raises(ValueError, match="no multiple of the stride 16"):
        ceiling_prediction(torch.zeros(40, 32, dtype=torch.long), 16, 6)


def test_scores_of_a_folder(tmp_path):
    write_domain(tmp_path, "val", n=2, size=(64, 64))  # random labels: one class wins each cell
    coarse = resolution_ceiling_scores(tmp_path, "val", stride=16)
    assert coarse["stride"] == 16 and coarse["pixels"] > 0
    assert coarse["miou"] < 50 and all(v is None or 0 <= v <= 100 for v in coarse["iou"])
    one_cell = resolution_ceiling_scores(tmp_path, "val", stride=16, resize=16)  # one cell a patch: one class
    assert sum(v is not None and v > 0 for v in one_cell["iou"]) <= 2 < sum(v is not None for v in one_cell["iou"])


def test_a_windowed_ceiling_is_each_window_ceiling_side_by_side():
    torch.manual_seed(1)
    label = torch.randint(0, 6, (8, 12)).repeat_interleave(8, 0).repeat_interleave(8, 1)  # 64 x 96
    windowed = ceiling_prediction(label, 16, 6, window=32)
    # Plain reference: the per-window upsampled scores put side by side, then one arg-max at full size.
    pieces = []
    for y in range(0, 64, 32):
        row = []
        for x in range(0, 96, 32):
            win = label[y:y + 32, x:x + 32]
            cells = torch.zeros(6, 2, 2, dtype=torch.float64)
            near = nearest_cell(32, 2)
            for i in range(32):
                for j in range(32):
                    cells[win[i, j], near[i], near[j]] += 1
            row.append(upsample_logits((cells / cells.sum(0)).float()[None], (8, 8)))
        pieces.append(torch.cat(row, -1))
    reference = upsampled_argmax(torch.cat(pieces, -2), (64, 96))[0]
    assert torch.equal(windowed, reference)
    assert not torch.equal(windowed, ceiling_prediction(label, 16, 6))  # the windows' borders matter
    with pytest.raises(ValueError, match="windows"):
        ceiling_prediction(label, 16, 6, window=48)
