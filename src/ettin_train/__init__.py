"""ettin-train: reproduce the Ettin paired encoder/decoder recipe on Composer."""

__version__ = "0.1.0"
