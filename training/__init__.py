"""Training and evaluation on Flickr8k: our dual encoder, or a pretrained open_clip model
fine-tuned the same way.

`python -m training ship` is the whole recipe in one command (train keeping the best epoch,
export, evaluate the exported file, write its card); `python -m training [train]`, `export` and
`evaluate` are its steps, each callable alone (see training/cli.py). Data comes from a Flickr8k
folder or from the object store ingest filled (`--from-store`), see data.py; the loop shared by
both model families is train.Trainer, the hubness bank is built in query_bank.py; features.py
caches frozen-tower features, recall.py computes Recall@K, plots.py draws the curves."""
