"""The engine: requests, blocks, scheduling, model running and the step loop."""
