"""The hubness bank: the same captions in the same order wherever it is built (training of
either model family, export), so that checkpoints made the same way get the same model id."""
import json

import torch

from encoder import DualEncoder, ModelConfig, load_checkpoint, save_checkpoint
from training.data import load_split_from_folder
from training.export import main as export_main
from training.query_bank import bank_caption_ids
from training.train import DualEncoderTrainer, TrainConfig


def test_bank_caption_ids_are_a_seeded_draw_in_draw_order():
    ids = bank_caption_ids(50, 10, seed=3)
    assert ids == bank_caption_ids(50, 10, seed=3) != bank_caption_ids(50, 10, seed=4)
    assert len(set(ids)) == 10 and ids != sorted(ids)
    assert sorted(bank_caption_ids(5, 10, seed=3)) == [0, 1, 2, 3, 4]  # fewer: all of them


def test_trainer_bank_holds_the_drawn_training_captions(tiny_flickr, tmp_path):
    root, _ = tiny_flickr
    train = load_split_from_folder(str(root), "train")
    torch.manual_seed(0)
    model = DualEncoder(ModelConfig(embed_dim=16))
    cfg = TrainConfig(epochs=1, batch_size=8, device="cpu", workers=0, query_bank=7, seed=3,
                      cache_dir=str(tmp_path / "c"))
    DualEncoderTrainer(model, train, None, cfg).fit()
    texts, _ = train.flat_captions()
    drawn = [texts[i] for i in bank_caption_ids(len(texts), 7, seed=3)]
    with torch.no_grad():
        expected = model.eval().encode_texts(drawn)
    assert model.query_bank.shape == (7, 16)
    assert torch.allclose(model.query_bank, expected, atol=1e-5)


def test_export_rebuilds_the_bank_the_same_way(tiny_flickr, tmp_path, capsys):
    root, _ = tiny_flickr
    torch.manual_seed(0)
    source = tmp_path / "source.pt"
    save_checkpoint(DualEncoder(ModelConfig(embed_dim=16)), source)
    ids = []
    for run in range(2):
        out = tmp_path / f"run{run}" / "model.pt"
        assert export_main(["--checkpoint", str(source), "--out", str(out), "--data", str(root),
                            "--query-bank", "9", "--seed", "5",
                            "--cache-dir", str(tmp_path / f"cache{run}")]) == 0
        ids.append(json.loads(capsys.readouterr().out)["model_id"])
    assert ids[0] == ids[1]  # made the same way: the same model id
    texts, _ = load_split_from_folder(str(root), "train").flat_captions()
    drawn = [texts[i] for i in bank_caption_ids(len(texts), 9, seed=5)]
    exported = load_checkpoint(tmp_path / "run0" / "model.pt").model
    with torch.no_grad():
        expected = load_checkpoint(source).model.encode_texts(drawn)
    assert torch.allclose(exported.query_bank, expected, atol=2e-3)  # stored in fp16


def test_open_clip_fine_tune_bank_and_model_id_are_reproducible(tiny_flickr, open_clip_spec,
                                                                tmp_path, capsys):
    from training.cli import main

    root, _ = tiny_flickr
    ids = []
    for run in range(2):
        torch.manual_seed(0)
        assert main(["--data", str(root), "--model", open_clip_spec, "--out",
                     str(tmp_path / f"run{run}" / "ft.pt"), "--epochs", "1", "--batch_size", "8",
                     "--device", "cpu", "--workers", "0", "--query-bank", "6", "--seed", "2",
                     "--no-plots", "--dev-limit", "4"]) == 0
        ids.append(json.loads(capsys.readouterr().out)["model_id"])
    assert ids[0] == ids[1]
    tuned = load_checkpoint(tmp_path / "run0" / "ft.pt").model
    texts, _ = load_split_from_folder(str(root), "train").flat_captions()
    drawn = [texts[i] for i in bank_caption_ids(len(texts), 6, seed=2)]
    with torch.no_grad():
        expected = tuned.encode_texts(drawn)
    assert torch.allclose(tuned.query_bank, expected, atol=2e-3)
