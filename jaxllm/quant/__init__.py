"""Weight quantization (int8 / int4, round-to-nearest, GPTQ, AWQ) and fake-quant for training."""
