"""Error types every layer shares: a user's bad input, and one record's reason to be skipped.

`DataError` is a `ValueError` whose message names the file and line (or field). `BadPair(reason,
detail)` says why one record cannot be used; the data layer counts it (`mpo.data.records.Rejects`)
or, in strict mode, turns it into a `DataError`. They live below every layer that raises them
(families, data, generation), so none of those reaches up to another for an exception type.
"""

from __future__ import annotations

# Why a record was skipped; the keys of `mpo data check --json`'s "rejected" object.
REASONS = {
    "malformed_json": "the line is not a JSON object",
    "missing_field": "a required field is missing",
    "bad_field": "a field has the wrong type or shape",
    "empty_response": "chosen or rejected is empty",
    "identical_responses": "chosen and rejected are the same text",
    "image_mismatch": "the <image> placeholders do not match the images",
    "missing_image": "an image file does not exist",
    "corrupt_image": "an image file cannot be decoded",
    "image_outside_root": "an image path leads outside the dataset's image root",
    "image_too_large": "an image has more pixels than data.max_image_pixels",
    "image_refused": "the model's image processor refuses the image (Qwen-VL: an aspect ratio over 200)",
    "no_vision": "the pair has images but the model is text-only",
    "too_long": "the pair does not fit the row budget",
}


class DataError(ValueError):
    """Bad input in strict mode: the message starts with 'path:line: reason'."""


class BadPair(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail
