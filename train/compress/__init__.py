"""Making models smaller: magnitude masks, structured pruning, distillation."""
