"""GPT-2 in TensorFlow 2 with OpenAI's variable names: the model, its trainer and name-based checkpoint I/O (checkpoint.py)."""
