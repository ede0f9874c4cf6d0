"""Second-order methods (empirical Fisher, WoodFisher/OBS, CBS, layerwise OBS): registered here."""
