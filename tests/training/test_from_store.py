"""`--from-store`: training and evaluation read Flickr8k from the bucket ingest filled (a real
S3 server), image for image the same data as the folder it came from."""
import functools
import json

import pytest
from torch.utils.data import DataLoader, Dataset

from core.settings import get_settings
from encoder import read_card
from objectstore import S3Store
from training.cli import main as train_main
from training.data import load_split_from_folder, load_split_from_store
from training.evaluate import main as eval_main


@pytest.fixture
def connect(flickr_in_store, s3_server):
    """Opens a new connection to the bucket the tiny set was ingested into."""
    return functools.partial(S3Store, s3_server["endpoint"], s3_server["access_key"],
                             s3_server["secret_key"], flickr_in_store.bucket)


@pytest.fixture
def store_settings(connect, s3_server, flickr_in_store, monkeypatch):
    """Settings pointing the training commands at that bucket."""
    for name, value in {"STORE_BACKEND": "s3", "MINIO_ENDPOINT": s3_server["endpoint"],
                        "MINIO_ACCESS_KEY": s3_server["access_key"],
                        "MINIO_SECRET_KEY": s3_server["secret_key"],
                        "MINIO_BUCKET": flickr_in_store.bucket}.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


class _Bytes(Dataset):
    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        return self.split.read(self.split.images[i]), i


def test_store_split_is_the_folder_split_even_in_worker_processes(tiny_flickr, connect):
    root, meta = tiny_flickr
    split = load_split_from_store(connect, "train")
    folder = load_split_from_folder(str(root), "train")
    assert split.images == folder.images == meta["train"] and split.captions == folder.captions
    split.read(split.images[0])  # the parent's pool now holds an open connection
    for _ in range(10):  # forked workers used to share it and read each other's images
        for data, i in DataLoader(_Bytes(split), batch_size=None, num_workers=2):
            assert data == folder.read(folder.images[i]), folder.images[i]


def test_training_from_the_store_equals_training_from_the_folder(tiny_flickr, store_settings,
                                                                  tmp_path, capsys):
    import torch

    root, meta = tiny_flickr
    # the pixel path: images decoded in two DataLoader worker processes each epoch
    recipe = ["--epochs", "2", "--batch_size", "8", "--embed-dim", "16", "--query-bank", "5",
              "--no-cache", "--workers", "2", "--device", "cpu", "--no-plots"]
    ids = {}
    for source in ("store", "folder"):
        torch.manual_seed(0)
        data = ["--from-store"] if source == "store" else ["--data", str(root)]
        out = tmp_path / source / "model.pt"
        assert train_main([*data, *recipe, "--out", str(out),
                           "--cache-dir", str(tmp_path / source / "cache")]) == 0
        ids[source] = json.loads(capsys.readouterr().out)["model_id"]
    assert ids["store"] == ids["folder"]
    card = read_card(tmp_path / "store" / "model.pt")
    assert card["data"]["source"].startswith("s3://") and card["data"]["train_images"] == \
        len(meta["train"])

    # evaluation from the store reproduces the training run's dev figures
    assert eval_main(["--from-store", "--checkpoint", str(tmp_path / "store" / "model.pt"),
                      "--device", "cpu", "--no-cache", "--no-write-card"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == len(meta["dev"])
    assert result["text_to_image"] == card["metrics"]["text_to_image"]
