"""UniBrain: a unified multimodal model for brain MRI with missing modalities."""

__version__ = "0.1.0"
