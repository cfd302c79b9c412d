"""Pretrained encoders (filled in by the pretrained-encoder work)."""
