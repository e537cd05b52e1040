"""Topic -> IAB mapping (stage 02): overrides, the mapper, labels, tier-1 accuracy, the detector-refit policy, the result."""
