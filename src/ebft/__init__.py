"""ebft: prune Hugging Face LLMs and recover them with block-wise fine-tuning."""
__version__ = "0.1.0"
