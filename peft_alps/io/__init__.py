"""Files: safetensors read byte by byte, all-or-nothing writes, the saved adapter folder (names, config, checks),
its integrity records and its model card."""
