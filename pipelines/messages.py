"""Warning categories of the pipelines, in a module light enough for the CLI to import at start."""


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the text encoder reads; the end was cut."""
