"""Errors of the model package that torch-free callers (the service's start-up) catch."""


class BackboneUnavailable(RuntimeError):
    """A model's parts (pretrained weights, a package) cannot be had here."""
