import torch

from training.recall import _ranks_i2t, _ranks_t2i, retrieval_metrics, summarize


def test_t2i_ranks_on_handmade_similarity():
    # 3 captions, 2 images; caption0->img0 ranked 1st, caption1->img0 ranked 2nd, caption2->img1 1st
    sim = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.0, 0.5]])
    owner = torch.tensor([0, 0, 1])
    assert _ranks_t2i(sim, owner).tolist() == [1, 2, 1]


def test_ties_count_against_the_correct_item():
    sim = torch.tensor([[0.5, 0.5, 0.5]])
    assert _ranks_t2i(sim, torch.tensor([0])).tolist() == [3]


def test_i2t_uses_best_of_the_image_captions():
    # image 0 owns captions 0,1; caption 1 is its best at rank 2 (caption 2 scores higher)
    sim = torch.tensor([[0.1, 0.6, 0.9], [0.3, 0.2, 0.1]])
    owner = torch.tensor([0, 0, 1])
    assert _ranks_i2t(sim, owner).tolist() == [2, 3]


def test_summary_recall_and_median():
    s = summarize(torch.tensor([1, 2, 6, 11]))
    assert s["R@1"] == 25.0 and s["R@5"] == 50.0 and s["R@10"] == 75.0
    assert s["median_rank"] == 4.0


def test_perfect_and_reversed_embeddings():
    img = torch.eye(4)
    owner = [0, 0, 1, 1, 2, 2, 3, 3]
    txt = img[owner]
    m = retrieval_metrics(img, txt, owner)
    assert m["text_to_image"]["R@1"] == 100.0 and m["image_to_text"]["R@1"] == 100.0
    worst = retrieval_metrics(img, -txt, owner)
    assert worst["text_to_image"]["R@1"] == 0.0
    assert worst["text_to_image"]["median_rank"] == 4.0
