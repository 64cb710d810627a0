"""Training and evaluation of the dual encoder on Flickr8k."""
