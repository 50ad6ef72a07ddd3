"""textmill: raw text corpora -> clean data -> fine-tuned GPT-2 -> published versions -> served models."""

__version__ = "0.1.0"
