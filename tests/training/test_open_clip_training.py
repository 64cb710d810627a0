"""open_clip models in the training package: zero-shot evaluation of a spec (tiny architecture,
random weights, registered from a JSON config in tests/encoder/test_open_clip.py)."""
import json

from tests.encoder.test_open_clip import ARCH, tiny_arch, weights_file  # noqa: F401 (fixtures)
from training.evaluate import main as eval_main


def test_zero_shot_evaluation_of_a_spec(tiny_flickr, weights_file, tmp_path, capsys):  # noqa: F811
    root, meta = tiny_flickr
    spec = f"open_clip:{ARCH}:{weights_file}"
    assert eval_main(["--data", str(root), "--checkpoint", spec, "--device", "cpu",
                      "--cache-dir", str(tmp_path / "c")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model_id"].startswith(f"open_clip-{ARCH}-")
    assert result["images"] == len(meta["dev"]) and result["captions"] == 5 * len(meta["dev"])
    assert 1 <= result["text_to_image"]["median_rank"] <= len(meta["dev"])
    assert result["scoring"].startswith("cosine")
