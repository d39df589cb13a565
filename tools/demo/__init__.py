"""The built-in demo: synthetic corridor images in the official layout and two tiny pre-trained Qwen2.5-VL models."""
