"""Flickr8k: its format (`format`) and where a copy comes from (`sources`: folder, zip, URL)."""
