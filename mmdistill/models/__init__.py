"""Students, trunks and encoders."""
