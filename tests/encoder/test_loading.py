"""The model factory (encoder/loading.py) and the protocol both model families satisfy."""
import ast
from pathlib import Path

import pytest
import torch

from encoder import EmbeddingModel, load_checkpoint, read_card, read_scoring, update_card
from encoder.scoring import Scoring
from tests.encoder.conftest import ARCH

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "flickr8k-dual-encoder.pt"

# Model ids as the loaders gave them before the factory: an index built by one of these models
# must still be served by the same model after any change to the loading code.
SHIPPED_ID = "flickr8k-dual-encoder-ce232b9040e3"
RANDOM_SPEC_ID = f"open_clip-{ARCH}-7c41661ddf4d"  # open_clip:<ARCH>, seeded random weights
FILE_SPEC_ID = f"open_clip-{ARCH}-5486b87bc17c"  # open_clip:<ARCH>:<the conftest weights file>


@pytest.fixture(scope="module")
def shipped():
    return load_checkpoint(SHIPPED)


def test_model_ids_stay_the_same(shipped, tiny_arch, weights_file):
    assert shipped.model_id == read_card(SHIPPED)["model_id"] == SHIPPED_ID
    assert load_checkpoint(str(SHIPPED)).model_id == SHIPPED_ID
    random = f"open_clip:{ARCH}"
    assert load_checkpoint(random).model_id == read_card(random)["model_id"] == RANDOM_SPEC_ID
    spec = f"open_clip:{ARCH}:{weights_file}"
    assert load_checkpoint(spec).model_id == read_card(spec)["model_id"] == FILE_SPEC_ID


def test_both_families_satisfy_the_protocol(shipped, weights_file):
    oc = load_checkpoint(f"open_clip:{ARCH}:{weights_file}")
    for loaded in (shipped, oc):
        m = loaded.model
        assert isinstance(m, EmbeddingModel) and not m.training
        tok = m.tokenize(["a dog on the beach"], tensors="np")
        ids, mask = torch.from_numpy(tok["input_ids"]), torch.from_numpy(tok["attention_mask"])
        size = m.image_spec.input_size
        with torch.no_grad():
            txt = m.encode_text_tokens(ids, mask)
            torch.testing.assert_close(txt, m.encode_texts(["a dog on the beach"]))
            img = m.encode_images(torch.zeros(1, 3, size, size))
        assert txt.shape == img.shape == (1, m.config.embed_dim)
    # the open_clip adapter carries open_clip's parts, not imitations of the dual encoder's
    assert not hasattr(oc.model, "image_backbone") and not hasattr(oc.model, "text_backbone")
    assert shipped.model.image_spec is shipped.model.image_backbone.spec


def test_scoring_read_without_building_equals_the_loaded_models(shipped):
    fast, full = read_scoring(SHIPPED), Scoring.of(shipped.model)
    assert (fast.index_dim, fast.corrected) == (full.index_dim, full.corrected)
    torch.testing.assert_close(fast.temperature, full.temperature)
    if full.corrected:
        torch.testing.assert_close(fast.bank, full.bank)


def test_update_card_keeps_the_model_id(small_checkpoint, tmp_path):
    import shutil

    path = tmp_path / "m.pt"
    shutil.copy(small_checkpoint, path)
    before = read_card(path)
    update_card(path, note="evaluated")
    after = read_card(path)
    assert after["model_id"] == before["model_id"] and after["note"] == "evaluated"
    assert load_checkpoint(path).card["note"] == "evaluated"
    with pytest.raises(ValueError, match="no model card"):
        update_card(f"open_clip:{ARCH}")


def _imports(path: Path) -> set[str]:
    """encoder.* modules `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "encoder":
                found |= {f"encoder.{a.name}" for a in node.names}
            elif node.module.startswith("encoder."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("encoder.")}
    return found


def test_no_import_circle_between_encoder_modules():
    modules = {f"encoder.{p.stem}": p for p in (ROOT / "encoder").glob("*.py")
               if p.stem != "__init__"}
    graph = {m: _imports(p) & set(modules) for m, p in modules.items()}

    def visit(m, path):
        assert m not in path, " -> ".join(path + [m])
        for n in graph[m]:
            visit(n, path + [m])

    for m in graph:
        visit(m, [])
