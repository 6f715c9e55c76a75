"""What one step is: the train state, the jitted steps, the optimizer, freezing, precision, FLOPs."""
