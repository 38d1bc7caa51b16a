"""Low-rank adapters (LoRA, QLoRA): `weight` (the adapted weight, as low as the QTensor format),
`adapters` (which weights, config, add / merge / split), `peft_format` (PEFT's files)."""
