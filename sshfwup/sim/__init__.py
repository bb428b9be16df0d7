"""The simulated A/B device: the one place that knows how a fake device is put together."""
