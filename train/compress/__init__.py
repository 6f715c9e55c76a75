"""Making models smaller: magnitude masks, structured pruning (train.prune), int8 exports (train.quantize),
distillation."""
