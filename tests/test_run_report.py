"""`mindhier report` on what the real `mindhier reconstruct` and `mindhier evaluate` write for two
subjects of the tiny world: the stimuli beside each subject's reconstructions, the strips, one
metric row per subject and their average; inputs that do not belong together are refused."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mindhier.checkpoint import save_checkpoint
from mindhier.cli import main
from mindhier.report import read_grid_row

from test_train_generator import make_stack, train_args

SHOW = 8


def subject_encoder(stack: dict, subject: int) -> Path:
    """A random tiny encoder for another subject of the stack's world (as make_stack makes subject 1's)."""
    from mindhier.data import TrainTrials
    from mindhier.encoder import PRESETS as ENC
    from mindhier.encoder import HierarchicalFMRIEncoder, VisionShape
    from mindhier.vision import load_vision

    shape = VisionShape.of(load_vision(stack["vision"]))
    voxels = TrainTrials(stack["world"], subject).num_voxels
    path = stack["root"] / f"encoder_s{subject}" / "encoder"
    save_checkpoint(path, HierarchicalFMRIEncoder(ENC["tiny"], voxels, shape).state_dict(), kind="encoder",
                    config=ENC["tiny"], extra={"num_voxels": voxels, "subject": subject,
                                               "vision": {"shape": dataclasses.asdict(shape), "path": str(stack["vision"])}})
    return path


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Per subject: train-generator (2 steps), reconstruct (all 20 test images, best-of-2), then
    one evaluate over both."""
    stack = make_stack(tmp_path_factory.mktemp("run_report"))
    root, recons = stack["root"], {}
    for subject in (1, 2):
        mine = {**stack, "encoder": stack["encoder"] if subject == 1 else subject_encoder(stack, subject)}
        assert main(train_args(mine, root / f"gen{subject}", "--subject", str(subject), steps=2)) == 0
        recons[subject] = root / f"recon_s{subject}"
        assert main(["reconstruct", "--data", str(stack["world"]), "--subject", str(subject),
                     "--encoder", str(mine["encoder"]), "--tokenizer", str(stack["tokenizer"]),
                     "--generator", str(root / f"gen{subject}" / "generator"), "--out", str(recons[subject]),
                     "--candidates", "2", "--top-k", "20", "--coarse-to-fine", "2", "--batch", "20"]) == 0
    assert main(["evaluate", "--recons", f"subj01={recons[1]}/recons.safetensors",
                 "--recons", f"subj02={recons[2]}/recons.safetensors", "--images", str(stack["world"]),
                 "--setting", "split=new_test", "--setting", "sampling=best-of-2", "--out", str(root / "eval"),
                 "--device", "cpu"]) == 0
    return {**stack, "recons": recons, "eval": root / "eval"}


def report_args(o: dict, out: Path, *extra: str, recons: dict | None = None, images: bool = True) -> list[str]:
    recons = recons or {"subj01": o["recons"][1], "subj02": o["recons"][2]}
    return ["report", "--recons", *(f"{k}={v}" for k, v in recons.items()), "--eval", str(o["eval"]),
            "--out", str(out), "--show", str(SHOW), "--strips", "2",
            *(["--images", str(o["world"])] if images else []), *extra]


def test_report_shows_every_subject_its_strips_and_the_scored_numbers(outputs):
    out = outputs["root"] / "report"
    assert main(report_args(outputs, out)) == 0
    html = (out / "report.html").read_text()
    assert '<img src="reconstructions.png"' in html
    for i in range(4):                                       # 2 strips per subject
        assert f'<img src="coarse_to_fine_{i}.png"' in html and (out / f"coarse_to_fine_{i}.png").is_file()
    assert html.count("<b>subj01, image ") == 2 and html.count("<b>subj02, image ") == 2
    assert "<td>subj01 (n=20)</td>" in html and "<td>subj02 (n=20)</td>" in html
    assert "<td><b>average</b> (2 subjects)</td>" in html
    assert "each band: stimulus, then subj01, subj02" in html and "new_test" in html
    scored = json.loads((outputs["eval"] / "metrics.json").read_text())["rows"]
    shown = json.loads((out / "report.json").read_text())["metrics"]
    assert shown["subj01 (n=20)"] == scored["subj01"] and shown["**average** (2 subjects)"] == scored["average"]


def test_grid_puts_each_stimulus_above_every_subjects_reconstruction_of_it(outputs):
    """Row 1 of the picture is the stimuli, rows 2 and 3 the subjects' scored (best-of-2) images."""
    from mindhier.data import ImageStore

    out = outputs["root"] / "report_grid"
    assert main(report_args(outputs, out)) == 0
    grid = Image.open(out / "reconstructions.png")
    rows = [np.asarray(grid.crop((0, r * 98, grid.size[0], r * 98 + 100))) for r in range(3)]
    first = {s: load_file(str(outputs["recons"][s] / "recons.safetensors")) for s in (1, 2)}
    index = first[1]["image_index"].numpy()
    assert np.array_equal(index, first[2]["image_index"].numpy())   # the world's subjects share their test images
    expected = [torch.from_numpy(ImageStore(outputs["world"]).get(index[:SHOW])), first[1]["recons"][:SHOW],
                first[2]["recons"][:SHOW]]
    for row, images in zip(rows, expected):
        Image.fromarray(row).save(out / "row.png")
        tiles = read_grid_row(out / "row.png")                     # 96 px tiles: 3x nearest upscale of 32 px
        np.testing.assert_allclose(tiles[:, :, ::3, ::3], images.float().numpy(), atol=1 / 255 + 1e-6)


def test_images_default_to_what_the_evaluation_scored_against(outputs):
    out = outputs["root"] / "report_default"
    assert main(report_args(outputs, out, images=False)) == 0
    assert f"`{outputs['world']}`" in (out / "report.md").read_text()


def edited_eval(outputs: dict, name: str, **changes) -> Path:
    """A copy of the evaluation with metrics.json fields replaced (``changes``: dotted keys)."""
    folder = outputs["root"] / name
    shutil.copytree(outputs["eval"], folder, dirs_exist_ok=True)
    result = json.loads((folder / "metrics.json").read_text())
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        target = result
        for key in path:
            target = target[key]
        target[last] = value
    (folder / "metrics.json").write_text(json.dumps(result))
    return folder


def test_inputs_that_do_not_belong_together_are_refused(outputs, capsys):
    o, root = outputs, outputs["root"]
    (root / "half").mkdir(exist_ok=True)
    (root / "exists").mkdir(exist_ok=True)
    (root / "exists" / "report.html").touch()
    from mindhier.world import PRESETS, generate_world

    other_world = generate_world(PRESETS["tiny"], root / "other_world", seed=7, show_progress=False)
    moved = {"recons__subj01": str(root / "moved" / "recons.safetensors")}   # scored, then moved away
    cases = [
        (report_args(o, root / "x", recons={"subj01": root / "nowhere", "subj02": o["recons"][2]}), "no such folder"),
        (report_args(o, root / "x", recons={"subj01": root / "half", "subj02": o["recons"][2]}),
         "settings.json: not found"),
        (report_args({**o, "eval": root / "half"}, root / "x"), "metrics.json: not found; score the reconstructions"),
        (report_args(o, root / "x", recons={"subj01": o["recons"][1]}), "scores subj01, subj02; --recons gives subj01"),
        (report_args(o, root / "x", recons={"subj01": o["recons"][2], "subj02": o["recons"][1]}),
         "scored subj01 from"),
        (report_args({**o, "eval": edited_eval(o, "e_count", **moved, n_images__subj01=19)}, root / "x"),
         "scored 19 images for subj01"),
        (report_args({**o, "eval": edited_eval(o, "e_sampling", setting__sampling="single-shot")}, root / "x"),
         "states sampling=single-shot, but it scored the best-of-2 set"),
        (report_args({**o, "eval": edited_eval(o, "e_swap", recons__subj01=str(o["recons"][2] / "recons.safetensors"),
                                               recons__subj02=str(o["recons"][1] / "recons.safetensors"))},
                     root / "x", recons={"subj01": o["recons"][2], "subj02": o["recons"][1]}),
         "reconstructed subject 2, but --recons names it subj01"),
        (report_args({**o, "world": other_world}, root / "x"), "was scored against"),
        (report_args({**o, "world": other_world, "eval": edited_eval(o, "e_images", images=str(root / "gone"))},
                     root / "x"), "reconstructed from"),
        (report_args(o, root / "exists"), "report.html exists"),
    ]
    capsys.readouterr()
    for args, message in cases:
        assert main(args) == 2, message
        err = capsys.readouterr().err
        assert message in err, (message, err)
    assert not (root / "x").exists()


def test_demo_layout_through_the_shared_writer(outputs):
    """One run (as the demo passes its own): stimulus over reconstruction, strips named by image."""
    from mindhier.run_report import read_recon_folder, write_reconstruction_report

    run = read_recon_folder(outputs["recons"][1])
    assert list(run.sets) == ["single-shot", "best-of-2"] and run.primary == "best-of-2"
    stimuli = torch.rand(len(run.image_index), 3, 32, 32)
    paths = write_reconstruction_report(
        outputs["root"] / "one", runs={"demo": run}, shown={"demo": run.recons}, stimuli={"demo": stimuli},
        n_images=4, n_strips=1, title="t", intro="i", settings={}, metric_rows=[("x", {"pixcorr": 0.5})],
        columns=[("pixcorr", "PixCorr", "float")])
    md = paths["md"].read_text()
    assert "top: stimulus, bottom: reconstruction" in md and f"**image {run.image_index[0]:06d}**" in md
    assert Image.open(outputs["root"] / "one" / "reconstructions.png").size == (4 * 98 + 2, 2 * 98 + 2)


def test_the_averaging_policy_is_shown_and_two_policies_never_share_a_table(outputs, capsys):
    """A folder reconstructed with --averaging outputs says so in evaluate's table and in the
    report; a table over folders of both policies is refused, and so is a stated policy that the
    folders contradict."""
    o, root = outputs, outputs["root"]
    rec = root / "recon_s1_outputs"
    assert main(["reconstruct", "--data", str(o["world"]), "--subject", "1", "--encoder", str(o["encoder"]),
                 "--tokenizer", str(o["tokenizer"]), "--generator", str(root / "gen1" / "generator"),
                 "--out", str(rec), "--averaging", "outputs", "--candidates", "2", "--top-k", "20",
                 "--coarse-to-fine", "2", "--batch", "20"]) == 0
    scored = root / "eval_outputs"
    assert main(["evaluate", "--recons", f"subj01={rec}/recons.safetensors", "--images", str(o["world"]),
                 "--setting", "sampling=best-of-2", "--out", str(scored), "--device", "cpu"]) == 0
    assert "| averaging | outputs |" in (scored / "metrics.md").read_text()
    assert main(["report", "--recons", f"subj01={rec}", "--eval", str(scored), "--out", str(root / "report_outputs"),
                 "--show", "4", "--strips", "1"]) == 0
    assert ("outputs: encoder run on each of the 3 repetitions, its outputs averaged (MindEye2) (settings.json)"
            in (root / "report_outputs" / "report.md").read_text())

    capsys.readouterr()
    assert main(["evaluate", "--recons", f"subj01={rec}/recons.safetensors", "--recons",
                 f"subj02={o['recons'][2]}/recons.safetensors", "--images", str(o["world"]),
                 "--out", str(root / "eval_mixed"), "--device", "cpu"]) == 2
    assert "mix the two averaging policies (subj01: outputs; subj02: voxels)" in capsys.readouterr().err
    mixed = edited_eval(o, "e_mixed", recons__subj01=str(rec / "recons.safetensors"))
    both = {"subj01": rec, "subj02": o["recons"][2]}
    assert main(report_args({**o, "eval": mixed}, root / "x_mixed", recons=both)) == 2
    assert "mix the two averaging policies (subj01: outputs; subj02: voxels)" in capsys.readouterr().err
    stated = edited_eval(o, "e_stated", setting__averaging="outputs")
    assert main(report_args({**o, "eval": stated}, root / "x_stated")) == 2
    err = capsys.readouterr().err
    assert "states averaging=outputs, but the reconstructions were made with averaging=voxels" in err
    assert not (root / "x_mixed").exists() and not (root / "x_stated").exists()
