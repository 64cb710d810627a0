"""Training-curve and example-query plots (PNG)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from encoder.preprocessing import decode_image  # noqa: E402
from encoder.scoring import Scoring  # noqa: E402

EXAMPLE_QUERIES = ["a dog running on the beach", "children playing in a fountain",
                   "a man riding a bike on a dirt path", "a group of people in the snow"]


def plot_history(history: list[dict], path: str | Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [h["loss"] for h in history], marker="o")
    a.set(title="train InfoNCE loss", xlabel="epoch")
    evald = [h for h in history if "dev" in h]
    for k in ("R@1", "R@5", "R@10"):
        b.plot([h["epoch"] for h in evald], [h["dev"]["text_to_image"][k] for h in evald],
               marker="o", label=f"text→image {k}")
    b.plot([h["epoch"] for h in evald], [h["dev"]["image_to_text"]["R@1"] for h in evald],
           linestyle="--", label="image→text R@1")
    b.set(title="dev recall (%)", xlabel="epoch")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


@torch.no_grad()
def plot_examples(model, split, path: str | Path, img: torch.Tensor,
                  queries: list[str] = EXAMPLE_QUERIES, k: int = 5) -> None:
    """Top-k images of `split` (embeddings `img`) for each query, scored as the service does."""
    q = model.eval().encode_texts(queries).float().cpu()
    scores, idx = Scoring.of(model).scores(q, img).topk(min(k, len(img)), dim=1)
    fig, axes = plt.subplots(len(queries), idx.shape[1], figsize=(2.2 * idx.shape[1], 2.4 * len(queries)),
                             squeeze=False)
    for r, query in enumerate(queries):
        for c in range(idx.shape[1]):
            ax = axes[r][c]
            name = split.images[idx[r, c]]
            ax.imshow(decode_image(split.read(name)))
            ax.set_title(f"{scores[r, c]:.3f}", fontsize=8)
            ax.axis("off")
        axes[r][0].text(-0.05, 0.5, query, transform=axes[r][0].transAxes, ha="right",
                        va="center", fontsize=9, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
