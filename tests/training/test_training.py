"""Training on a tiny slice: the loss falls, retrieval is learned, the checkpoint reloads exactly."""
import json
from pathlib import Path

import torch

from encoder import Encoder, ModelConfig, load_checkpoint, read_card, save_checkpoint
from training.cli import main as train_main
from training.data import load_split_from_folder
from training.evaluate import main as eval_main
from training.train import (DualEncoderTrainer, NegativesQueue, TrainConfig, build_model,
                            contrastive_loss)


def test_loss_falls_and_checkpoint_reloads(tiny_flickr, tmp_path, capsys):
    root, meta = tiny_flickr
    out = tmp_path / "m.pt"
    rc = train_main(["--data", str(root), "--out", str(out), "--epochs", "25", "--batch_size", "12",
                     "--lr", "3e-3", "--embed-dim", "32", "--cache-dir", str(tmp_path / "cache"),
                     "--device", "cpu", "--workers", "0", "--eval-every", "5"])
    assert rc == 0
    history = [json.loads(line) for line in out.with_suffix(".log.jsonl").read_text().splitlines()]
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    assert out.with_suffix(".curve.png").stat().st_size > 1000
    assert out.with_suffix(".examples.png").stat().st_size > 1000
    dev = history[-1]["dev"]["text_to_image"]
    assert dev["R@5"] > 100 * 5 / len(meta["dev"])  # better than chance

    card = read_card(out)
    assert card["metrics"]["split"] == "dev" and card["backbones"]["image"] == "efficientnet_lite0"
    assert card["config"]["embed_dim"] == 32

    # reloads to the same embeddings the trained model produced (fp16 storage: ~1e-3)
    enc = Encoder.from_checkpoint(str(out))
    texts = ["a red circle", "a blue square"]
    v = enc.encode_texts(texts)
    assert v.shape == (2, 32) and abs(float((v ** 2).sum(1).mean()) - 1) < 1e-4
    again = Encoder.from_checkpoint(str(out)).encode_texts(texts)
    assert abs(v - again).max() < 1e-6

    # the evaluation command reproduces the training run's dev numbers and writes the card
    capsys.readouterr()
    assert eval_main(["--data", str(root), "--checkpoint", str(out), "--device", "cpu",
                      "--cache-dir", str(tmp_path / "cache")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert abs(result["text_to_image"]["R@1"] - dev["R@1"]) <= 100 / len(meta["dev"]) / 5 + 1e-6
    assert read_card(out)["metrics"]["text_to_image"] == result["text_to_image"]


def test_fine_tuning_tail_stages_changes_them_and_saves_them(tiny_flickr, tmp_path):
    root, _ = tiny_flickr
    train = load_split_from_folder(str(root), "train")
    model = build_model(ModelConfig(embed_dim=16, image_tail_stages=2))
    before = model.image_backbone.stages[-1].conv.weight.detach().clone()
    frozen_before = model.image_backbone.stages[0].conv.weight.detach().clone()
    cfg = TrainConfig(epochs=2, batch_size=8, device="cpu", cache_dir=str(tmp_path / "c"),
                      workers=0, tail_lr=1e-3)
    DualEncoderTrainer(model, train, None, cfg).fit()
    assert not torch.equal(before, model.image_backbone.stages[-1].conv.weight)
    assert torch.equal(frozen_before, model.image_backbone.stages[0].conv.weight)
    keys = model.trainable_state_keys()
    assert any(k.startswith("image_backbone.stages.17.") for k in keys)
    assert not any(k.startswith("image_backbone.stages.0.") for k in keys)

    # fp16 and int8 storage of the fine-tuned tail reload to nearly the same image embeddings
    pixels = torch.randn(4, 3, 224, 224)
    model.eval()
    with torch.no_grad():
        ref = model.encode_images(pixels)
    for int8 in (False, True):
        path = tmp_path / f"tail-{int8}.pt"
        save_checkpoint(model, path, int8_backbone=int8)
        with torch.no_grad():
            got = load_checkpoint(path).model.encode_images(pixels)
        assert (ref * got).sum(1).min() > (0.99 if int8 else 0.999)
    assert (tmp_path / "tail-True.pt").stat().st_size < (tmp_path / "tail-False.pt").stat().st_size


def test_pixel_path_runs(tiny_flickr, tmp_path):
    """The GPU path (decode + augment each epoch) also runs on the CPU."""
    root, _ = tiny_flickr
    train = load_split_from_folder(str(root), "train").subset(8)
    model = build_model(ModelConfig(embed_dim=16, image_tail_stages=1))
    cfg = TrainConfig(epochs=1, batch_size=4, device="cpu", cache=False, workers=0,
                      cache_dir=str(tmp_path / "c"))
    hist = DualEncoderTrainer(model, train, train, cfg).fit()
    assert hist[0]["loss"] > 0 and "dev" in hist[0]


def test_training_writes_under_runs_by_default(tmp_path, monkeypatch, capsys):
    """Without --out a new checkpoint never replaces the shipped MODEL_PATH."""
    import training.cli as cli

    written = []

    class StubTrainer:
        history, selected = [], {}

        def fit_and_save(self, out, data_desc):
            written.append(out)
            return "id"

    monkeypatch.setattr(cli, "RUNS_DIR", tmp_path / "runs")
    monkeypatch.setattr(cli, "make_trainer", lambda args, out: (StubTrainer(), "stub"))
    assert cli.main(["--no-plots"]) == 0
    out = Path(written[0])
    assert out.parent == tmp_path / "runs" and out.name.startswith("dual-encoder-")
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(out)


def test_contrastive_loss_counts_every_caption_of_an_image():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(12, 8), dim=1)
    scale = torch.tensor(10.0)
    # one caption per image: the usual symmetric CLIP loss
    labels = torch.arange(4)
    logits = scale * img @ txt[:4].T
    clip = (torch.nn.functional.cross_entropy(logits, labels)
            + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(contrastive_loss(img, txt[:4], labels, scale), clip)
    # three captions per image: each caption's own image is its target, and image->text
    # averages log p over the image's three captions
    owner = torch.arange(4).repeat_interleave(3)
    logits = scale * img @ txt.T
    t2i = torch.nn.functional.cross_entropy(logits.T, owner)
    log_p = logits.log_softmax(1)
    i2t = -torch.stack([log_p[i, owner == i].mean() for i in range(4)]).mean()
    assert torch.allclose(contrastive_loss(img, txt, owner, scale), (t2i + i2t) / 2)
    # queued vectors of the batch's own images are left out; others are negatives
    ids = torch.tensor([7, 8, 9, 10])
    same = NegativesQueue(8, 8, "cpu")
    same.push(img, txt[:4], ids, ids)
    assert torch.allclose(contrastive_loss(img, txt, owner, scale, same, ids),
                          contrastive_loss(img, txt, owner, scale))
    other = NegativesQueue(8, 8, "cpu")
    other.push(img, txt[:4], ids + 100, ids + 100)
    assert contrastive_loss(img, txt, owner, scale, other, ids) > \
        contrastive_loss(img, txt, owner, scale)


def test_multi_positive_training_keeps_best_epoch_and_reports_every_set(tiny_flickr, tmp_path,
                                                                       flickr_style_set, capsys):
    root, meta = tiny_flickr
    extra = flickr_style_set("ood-set", meta["dev"][:6])
    out = tmp_path / "m.pt"
    assert train_main(["--data", str(root), "--out", str(out), "--epochs", "6", "--batch_size", "8",
                       "--lr", "3e-3", "--embed-dim", "32", "--cache-dir", str(tmp_path / "c"),
                       "--device", "cpu", "--workers", "0", "--eval-every", "2", "--no-plots",
                       "--loss", "multi-positive", "--negatives-queue", "16", "--keep-best",
                       "--eval-set", str(extra)]) == 0
    result = json.loads(capsys.readouterr().out)
    history = [json.loads(line) for line in out.with_suffix(".log.jsonl").read_text().splitlines()]
    scored = [r for r in history if "selection_score" in r]
    assert [r["epoch"] for r in scored] == [2, 4, 6] and all("ood-set" in r["sets"] for r in scored)
    best = max(scored, key=lambda r: r["selection_score"])
    card = read_card(out)
    assert card["training"]["selected_epoch"] == best["epoch"] == result["epoch"]
    assert card["evaluations"]["ood-set"]["images"] == 6
    assert card["evaluations"]["ood-set"]["text_to_image"] == best["sets"]["ood-set"]["text_to_image"]
    assert card["metrics"]["text_to_image"] == best["dev"]["text_to_image"]


def test_evaluate_reports_any_flickr8k_style_folder_under_its_name(tiny_flickr, small_checkpoint,
                                                                   tmp_path, flickr_style_set,
                                                                   capsys):
    import shutil

    root, meta = tiny_flickr
    extra = flickr_style_set("my-photos", meta["dev"][:5])
    ckpt = tmp_path / "m.pt"
    shutil.copy(small_checkpoint, ckpt)
    args = ["--data", str(root), "--checkpoint", str(ckpt), "--device", "cpu",
            "--cache-dir", str(tmp_path / "c")]
    assert eval_main([*args, "--set", str(extra)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results) == {"dev", "my-photos"}
    assert results["my-photos"]["images"] == 5 and results["my-photos"]["captions"] == 25
    card = read_card(ckpt)
    assert card["evaluations"]["my-photos"]["text_to_image"] == results["my-photos"]["text_to_image"]
    assert card["metrics"]["text_to_image"] == results["dev"]["text_to_image"]
    # a later run of one set keeps the other set's figures
    assert eval_main([*args, "--split", "none", "--set", str(extra)]) == 0
    assert set(read_card(ckpt)["evaluations"]) == {"dev", "my-photos"}
