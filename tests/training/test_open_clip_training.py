"""open_clip models in the training package: zero-shot evaluation of a spec, fine-tuning (a tiny
architecture with random weights: the `open_clip_spec` fixture)."""
import json

from training.cli import main as train_main
from training.evaluate import main as eval_main


def test_zero_shot_evaluation_of_a_spec(tiny_flickr, open_clip_spec, tmp_path, capsys):
    root, meta = tiny_flickr
    spec = open_clip_spec
    arch = spec.split(":")[1]
    assert eval_main(["--data", str(root), "--checkpoint", spec, "--device", "cpu",
                      "--cache-dir", str(tmp_path / "c")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model_id"].startswith(f"open_clip-{arch}-")
    assert result["images"] == len(meta["dev"]) and result["captions"] == 5 * len(meta["dev"])
    assert 1 <= result["text_to_image"]["median_rank"] <= len(meta["dev"])
    assert result["scoring"].startswith("cosine")


def test_fine_tune_reload_and_serve(tiny_flickr, open_clip_spec, tmp_path, capsys):
    """One epoch of the last blocks: only they (and the projections) change, the checkpoint holds
    only them, and it reloads (base spec + deltas) to the trained model's embeddings."""
    import torch

    from encoder import Encoder, load_checkpoint, read_card

    root, meta = tiny_flickr
    spec = open_clip_spec
    out = tmp_path / "ft.pt"
    assert train_main(["--data", str(root), "--model", spec, "--train-part", "last-blocks",
                       "--last-blocks", "1", "--out", str(out), "--epochs", "2",
                       "--batch_size", "8", "--lr", "1e-3", "--device", "cpu", "--workers", "0",
                       "--eval-every", "1", "--query-bank", "20", "--no-plots"]) == 0
    result = json.loads(capsys.readouterr().out)
    base = load_checkpoint(spec).model
    tuned = load_checkpoint(out)
    card = read_card(out)
    assert card["base"]["spec"] == spec and card["fine_tuned"]["part"] == "last-blocks"
    assert tuned.model_id == result["model_id"] != load_checkpoint(spec).model_id
    prefixes = card["fine_tuned"]["prefixes"]
    assert "transformer.resblocks.1." in prefixes and "visual.transformer.resblocks.1." in prefixes
    assert not any(p.startswith(("transformer.resblocks.0.", "visual.conv1")) for p in prefixes)
    # frozen weights equal the base, trained ones moved
    b, t = base.clip.state_dict(), tuned.model.clip.state_dict()
    assert torch.equal(b["visual.conv1.weight"], t["visual.conv1.weight"])
    assert not torch.allclose(b["transformer.resblocks.1.mlp.c_fc.weight"],
                              t["transformer.resblocks.1.mlp.c_fc.weight"])
    # the hubness bank came along, and the service's encoder reloads it identically
    assert tuned.model.query_bank.shape == (20, 32)
    texts = ["a red circle", "a blue square"]
    one = Encoder.from_checkpoint(str(out)).encode_texts(texts)
    two = Encoder.from_checkpoint(str(out)).encode_texts(texts)
    assert abs(one - two).max() < 1e-6
    with torch.no_grad():
        again = tuned.model.encode_texts(texts).numpy()
    assert abs(one - again).max() < 1e-3  # ONNX vs eager of the same weights
    assert result["dev"]["text_to_image"]["R@10"] >= 0


def test_ship_an_open_clip_fine_tune(tiny_flickr, open_clip_spec, tmp_path, capsys):
    """`ship --model`: fine-tune, export, evaluate the exported file; its card keeps the base."""
    from encoder import load_checkpoint, read_card

    root, _ = tiny_flickr
    out = tmp_path / "shipped.pt"
    assert train_main(["ship", "--data", str(root), "--model", open_clip_spec, "--out", str(out),
                       "--train-out", str(tmp_path / "run.pt"), "--epochs", "2",
                       "--batch_size", "8", "--device", "cpu", "--workers", "0",
                       "--query-bank", "6"]) == 0
    result = json.loads(capsys.readouterr().out)
    card = read_card(out)
    assert result["model_id"] == load_checkpoint(out).model_id
    assert card["base"]["spec"] == open_clip_spec and card["exported_from"]["storage"] == "fp16"
    assert card["exported_from"]["model_id"] == result["trained"]["model_id"]
    assert card["evaluations"]["dev"]["text_to_image"] == \
        result["evaluations"]["dev"]["text_to_image"]
    assert (tmp_path / "shipped.examples.png").exists()
