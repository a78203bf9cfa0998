"""Command-line tools: weight import from other libraries (`import_timm`)."""
