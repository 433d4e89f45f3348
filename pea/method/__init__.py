"""The PEA method itself (METHOD.md): the adapter, its distillation objective, and the random LoRAs it is
distilled under."""
