"""Recipe launcher: declarative YAML recipes for distributed fine-tuning of pretrained language models."""

__version__ = "0.1.0"
