"""What one step is: the train state, the jitted steps, the optimizer, freezing, precision, FLOPs, and
the TPU plan that compiles the step for a topology (planning.py: train.plan)."""
