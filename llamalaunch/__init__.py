"""llamalaunch: plan and launch llama.cpp's llama-server across uneven devices."""

__version__ = "0.1.0"
