"""Response cache tiers and the request identity they (and the recorder) key on."""
