"""What can go wrong with one request, as typed exceptions that carry their HTTP status.

The handler turns them into a 4xx/5xx answer for that request alone (``FruitHandler._respond``);
``fruit-batch --local`` turns them into that file's error row. Nothing else maps them.
"""

from __future__ import annotations


class RequestError(Exception):
    """One request (or one image of it) cannot be answered with a prediction."""

    status = 400
    code = "bad_request"

    def to_dict(self) -> dict:
        return {"error": str(self), "code": self.status, "type": self.code}


class InputError(RequestError):
    """The client's fault: the request or file is not a usable image (4xx)."""


class EmptyInput(InputError):
    code = "empty_input"


class UnsupportedImage(InputError):
    status = 415
    code = "unsupported_media_type"


class CorruptImage(InputError):
    code = "corrupt_image"


class ImageTooLarge(InputError):
    status = 413
    code = "image_too_large"


class TooManyImages(InputError):
    status = 413
    code = "too_many_images"


class HandlerFailure(RequestError):
    """Not the client's fault: an unexpected exception while reading one request, answered 500 for it alone."""

    status = 500
    code = "internal_error"


class ModelDirError(Exception):
    """A run folder, ``.mar`` or model store entry that lacks what serving needs, or whose files disagree."""
