"""`python -m training ship`: the recipe (train keeping the best epoch, export, evaluate the
exported file, card and plots) in one command, and the same result as its steps run alone."""
import json
import subprocess
import sys

import pytest
import torch

from encoder import load_checkpoint, read_card
from training.cli import main

FIGURES = ("text_to_image", "image_to_text")


def _run(argv: list[str], capsys) -> dict:
    capsys.readouterr()
    # heads are initialised before --seed applies: from the generator's state, as a fresh
    # process has it; start each run from one state
    torch.manual_seed(1234)
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_ship_equals_train_export_evaluate(tiny_flickr, tmp_path, flickr_style_set, capsys):
    root, meta = tiny_flickr
    extra = flickr_style_set("ood-set", meta["dev"][:6])
    recipe = ["--data", str(root), "--epochs", "4", "--eval-every", "2", "--batch_size", "8",
              "--lr", "3e-3", "--embed-dim", "16", "--unfreeze-image-stages", "1",
              "--query-bank", "10", "--loss", "multi-positive", "--eval-set", str(extra),
              "--device", "cpu", "--workers", "0"]
    one, steps = tmp_path / "one", tmp_path / "steps"
    # separate feature caches: a cache miss draws from the random generator (DataLoader seed)
    shipped = _run(["ship", *recipe, "--cache-dir", str(one / "cache"),
                    "--train-out", str(one / "run.pt"), "--out", str(one / "model.pt"),
                    "--int8-backbone"], capsys)

    trained = _run(["train", *recipe, "--cache-dir", str(steps / "cache"), "--keep-best",
                    "--no-plots", "--out", str(steps / "run.pt")], capsys)
    exported = _run(["export", "--checkpoint", str(steps / "run.pt"),
                     "--out", str(steps / "model.pt"), "--int8-backbone"], capsys)
    evaluated = _run(["evaluate", "--data", str(root), "--set", str(extra), "--device", "cpu",
                      "--cache-dir", str(steps / "cache"), "--checkpoint",
                      str(steps / "model.pt")], capsys)

    # the same weights at each stage: checkpoints made the same way get the same model id
    assert shipped["trained"]["model_id"] == trained["model_id"]
    assert shipped["trained"]["epoch"] == trained["epoch"]
    assert shipped["model_id"] == exported["model_id"] == \
        load_checkpoint(one / "model.pt").model_id
    card, step_card = read_card(one / "model.pt"), read_card(steps / "model.pt")
    assert set(card["evaluations"]) == set(evaluated) == {"dev", "ood-set"}
    for name in ("dev", "ood-set"):
        for key in FIGURES:
            assert card["evaluations"][name][key] == step_card["evaluations"][name][key] \
                == evaluated[name][key] == shipped["evaluations"][name][key]
    assert card["metrics"][FIGURES[0]] == card["evaluations"]["dev"][FIGURES[0]]
    # the card says what ships and where it came from
    assert card["exported_from"]["model_id"] == shipped["trained"]["model_id"]
    assert card["exported_from"]["storage"].startswith("int8")
    assert card["training"]["keep_best"] and card["training"]["selected_epoch"] == \
        shipped["trained"]["epoch"]
    assert card["config"]["query_bank_size"] == 10
    assert (one / "model.curve.png").stat().st_size > 1000
    # and its 0-100 match score is calibrated on dev, as `calibrate` alone would
    calibrated = _run(["calibrate", "--data", str(root), "--device", "cpu", "--cache-dir",
                       str(steps / "cache"), "--checkpoint", str(steps / "model.pt")], capsys)
    assert card["match_scale"]["knots"] == read_card(steps / "model.pt")["match_scale"]["knots"]
    assert calibrated
    assert (one / "model.examples.png").stat().st_size > 1000


def test_ship_refuses_int8_for_an_open_clip_model(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["ship", "--model", "open_clip:ViT-B-32:x.bin", "--out", "x.pt", "--int8-backbone"])
    assert exc.value.code == 2 and "--int8-backbone" in capsys.readouterr().err


def test_every_command_line_still_answers():
    """`python -m training` with and without a command, and the steps' own modules."""
    for argv in (["-m", "training", "--help"], ["-m", "training", "ship", "--help"],
                 ["-m", "training", "export", "--help"], ["-m", "training.export", "--help"],
                 ["-m", "training.evaluate", "--help"], ["-m", "training", "calibrate", "--help"]):
        out = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, (argv, out.stderr)
        assert "usage: python -m training" in out.stdout
