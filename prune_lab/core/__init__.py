"""Pure tensor math: the layer graph, scores, allocations and masks. No UI imports here."""
