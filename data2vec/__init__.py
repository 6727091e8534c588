"""data2vec: self-supervised pretraining with data2vec 1.0 and 2.0 for images, speech and text."""

from data2vec._runtime import configure_cpu_runtime

configure_cpu_runtime()  # must run before torch is imported anywhere in the package

__version__ = "0.1.0"


def load_model(path, weights: str = "student"):
    """Load an encoder: ``(config, encoder)`` from a model, checkpoint or run directory.

    The encoder is in eval mode on the CPU; a text encoder carries its ``tokenizer``.
    ``weights="teacher"`` loads the EMA teacher where the directory has one.
    """
    from data2vec.evaluate.features import load_encoder

    return load_encoder(path, weights)  # type: ignore[arg-type]


def save_model(path, config, encoder):
    """Write ``encoder`` and its ``config`` as a model directory :func:`load_model` reads:
    ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json`` for text)."""
    from data2vec.convert.export import export_encoder

    return export_encoder(path, config, encoder)


# The names Hugging Face users reach for.
from_pretrained = load_model
save_pretrained = save_model
