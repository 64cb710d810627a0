"""Demo client for the running search API.

    python demo.py --query "a dog running on the beach" --top_k 5
        searches the service's index;
    python demo.py --images_dir DIR --query "..." --top_k 5
        (the original flow) encodes every image of DIR through /encode_image, then asks
        /search_images_by_text to rank exactly those embeddings.

Prints the top-k, best first, each with its match (0-100: how its score compares with true
caption matches of the model's dev split; the ranking score itself for a model without a match
scale), and saves them as a picture (--out). --min_match N leaves out matches below N.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import httpx

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--api", default="http://127.0.0.1:8000", help="base URL of the search API")
    p.add_argument("--images_dir", help="rank the images of this folder instead of the index")
    p.add_argument("--query", default="a dog running on the beach")
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--min_match", type=float, help="leave out results below this match (0-100)")
    p.add_argument("--out", default="demo_results.png", help="picture of the results")
    p.add_argument("--api-key", help="X-API-Key for /encode_image when the service requires one")
    args = p.parse_args(argv)

    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    with httpx.Client(base_url=args.api, timeout=60, headers=headers) as http:
        try:
            health = http.get("/health").raise_for_status().json()
        except httpx.HTTPError as exc:
            print(f"error: the API at {args.api} is not answering ({exc})", file=sys.stderr)
            return 1
        print(f"API {health['status']}: model {health['model_id']}, index "
              f"{health['index_version']} ({health['vector_count']} images)")

        images: dict[str, bytes] = {}
        filters = {} if args.min_match is None else {"min_match": args.min_match}
        if args.images_dir:
            files = sorted(f for f in Path(args.images_dir).iterdir()
                           if f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                print(f"error: no images in {args.images_dir}", file=sys.stderr)
                return 1
            embeddings = []
            for f in files:
                data = f.read_bytes()
                r = http.post("/encode_image", files={"image": (f.name, data, "image/jpeg")})
                if r.status_code != 200:
                    print(f"skipping {f.name}: {r.json().get('detail')}", file=sys.stderr)
                    continue
                images[f.name] = data
                embeddings.append({**r.json(), "filename": f.name})
            print(f"encoded {len(embeddings)} images from {args.images_dir}")
            r = http.post("/search_images_by_text", data={
                "text": args.query, "top_k": str(args.top_k),
                "image_embeddings": json.dumps(embeddings), **filters})
        else:
            r = http.post("/search_images_by_text",
                          json={"query": args.query, "top_k": args.top_k, **filters})
        if r.status_code != 200:
            print(f"error: search failed: {r.status_code} {r.text}", file=sys.stderr)
            return 1
        results = r.json()["results"]

        print(f'\ntop {len(results)} for "{args.query}":')
        for hit in results:
            print(f"  {hit['rank']:>2}. {shown(hit):>11}  {hit['filename']}")
        for hit in results:
            if hit["filename"] not in images and hit.get("url"):
                images[hit["filename"]] = http.get(hit["url"]).content
        save_picture(args.query, results, images, args.out)
        print(f"\nsaved {args.out}")
    return 0


def shown(hit: dict) -> str:
    """The one number of a hit, falling along the ranking: its match, or (a model without a
    match scale) the score it is ranked by."""
    if hit.get("match") is not None:
        return f"{hit['match']:.0f}% match"
    return f"score {hit['score']:.3f}"


def save_picture(query: str, results: list[dict], images: dict[str, bytes], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n = max(1, len(results))
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.4), squeeze=False)
    for ax, hit in zip(axes[0], results):
        data = images.get(hit["filename"])
        if data:
            ax.imshow(Image.open(io.BytesIO(data)).convert("RGB"))
        ax.set_title(f"{hit['rank']}. {shown(hit)}\n{hit['filename']}", fontsize=8)
        ax.axis("off")
    fig.suptitle(query)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(out, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
