"""Errors of the model package that torch-free callers (the service's start-up) catch."""


class BackboneUnavailable(RuntimeError):
    """A model's parts (pretrained weights, a package) cannot be had here."""


class NoSpatialMap(ValueError):
    """The model's image tower has no spatial feature map to explain a match with."""

    def __init__(self, message: str = "explanations need a model with a spatial feature map"):
        super().__init__(message)
