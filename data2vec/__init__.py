"""data2vec: self-supervised pretraining with data2vec 1.0 and 2.0 for images, speech and text."""

from data2vec._runtime import configure_cpu_runtime

configure_cpu_runtime()  # must run before torch is imported anywhere in the package

__version__ = "0.1.0"
