"""The report lays out exactly the numbers and images it is given."""

import json

import numpy as np
from PIL import Image

from mindhier.report import markdown_to_html, metric_table_markdown, to_uint8, write_report


def test_to_uint8_maps_range_and_layout():
    x = np.zeros((1, 3, 2, 2), np.float32)
    x[0, 0] = 1.0
    x[0, 1] = 0.5
    out = to_uint8(x)
    assert out.shape == (1, 2, 2, 3) and out[0, 0, 0].tolist() == [255, 128, 0]


def test_table_marks_missing_metrics_not_available():
    md = metric_table_markdown(
        [("ours", {"pixcorr": 0.25, "clip": 0.9, "alex2": None})],
        [("pixcorr", "PixCorr", "float"), ("clip", "CLIP", "percent"), ("alex2", "Alex(2)", "percent")],
    )
    assert "| ours | 0.250 | 90.00% | n/a |" in md


def test_write_report_files(tmp_path):
    rng = np.random.default_rng(0)
    gt, rec = rng.random((10, 3, 8, 8)), rng.random((10, 3, 8, 8))
    paths = write_report(
        tmp_path, title="t", intro="i", settings={"split": "test"},
        metric_rows=[("ours", {"pixcorr": 0.1})], columns=[("pixcorr", "PixCorr", "float")],
        gt=gt, recon=rec, strips=[("image 3", rng.random((4, 3, 8, 8)))], timings={"world": 1.5},
    )
    html = paths["html"].read_text()
    assert "<table>" in html and "reconstructions.png" in html and "coarse_to_fine_0.png" in html
    grid = Image.open(tmp_path / "reconstructions.png")
    assert grid.size[1] > grid.size[0] / 8  # two bands of (gt, recon) rows
    assert json.loads(paths["json"].read_text())["metrics"]["ours"]["pixcorr"] == 0.1


def test_markdown_to_html_escapes_text():
    assert "&lt;script&gt;" in markdown_to_html("x", "<script>")


def test_read_grid_row_inverts_image_grid(tmp_path):
    from mindhier.report import image_grid, read_grid_row

    tiles = np.random.default_rng(1).random((3, 3, 4, 4))
    image_grid([tiles], cell=8).save(tmp_path / "row.png")
    back = read_grid_row(tmp_path / "row.png", cell=8)
    assert back.shape == (3, 3, 8, 8)
    np.testing.assert_allclose(back[:, :, ::2, ::2], tiles, atol=1 / 255)
